"""What several test modules share: the repository root, tolerance checks, the tiny model
config and its random batches, the parity goldens, data-parallel train steps, and the flags
of the small train.py and bench.py runs. absl's flags are parsed here with their defaults
(train.py's functions read them)."""

import itertools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl.testing import flagsaver

import ckpt
import model
import train

ROOT = pathlib.Path(__file__).parents[1]
TESTDATA = pathlib.Path(__file__).parent / "testdata"
if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"])

# train.py's flags for a tiny run on built-in data: 60 training puzzles with 40-45 blanks
# (4 augmentations each) and 20 test puzzles; a D=32 MLP-mixer, T=2, n=1, N_sup=3; batch 16.
# `run_flags` makes the command line, with a test's changes.
TINY_RUN = {
    "builtin_train": 60,
    "builtin_test": 20,
    "builtin_blanks": "40,45",
    "builtin_aug": 4,
    "hidden_size": 32,
    "num_heads": 2,
    "H_cycles": 2,
    "L_cycles": 1,
    "halt_max_steps": 3,
    "puzzle_emb_len": 1,
    "global_batch_size": 16,
    "forward_dtype": "float32",
    "lr": "3e-3",
    "lr_warmup_steps": 2,
    "log_every": 1,
}
# The smallest model of the bench.py and train.py runs: D=16, T=1, n=1, N_sup=2, float32.
SMALL_MODEL = {
    "hidden_size": 16,
    "num_heads": 2,
    "H_cycles": 1,
    "L_cycles": 1,
    "halt_max_steps": 2,
    "forward_dtype": "float32",
}
# A run whose loss becomes NaN at its first steps (an absurd learning rate): the command of
# docs/TROUBLESHOOTING.md's "NaN or Inf loss".
NAN_RUN = {
    "builtin_train": 20,
    "builtin_test": 8,
    "builtin_aug": 0,
    **SMALL_MODEL,
    "global_batch_size": 8,
    "lr": "1e30",
    "lr_warmup_steps": 0,
    "epochs": 4,
    "eval_interval": 4,
    "log_every": 1,
}


def run_flags(values, **changes):
    """["--name=value", ...] of a dict of flag values, with `changes` replacing or adding."""
    return [f"--{name}={value}" for name, value in (values | changes).items()]


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    ok = err <= atol + rtol * np.abs(expected)
    assert ok.all(), (
        f"{what}: max abs err {err.max():.3g}, mean {err.mean():.3g}, "
        f"{(~ok).sum()} of {ok.size} beyond atol={atol} rtol={rtol}"
    )


def golden(name):
    """A parity golden of tests/testdata: (its arrays, config, params, batch)."""
    g = np.load(TESTDATA / f"{name}.npz")
    cfg = model.Config.from_reference(json.loads((TESTDATA / f"{name}.json").read_text()))
    state = {k.removeprefix("state/"): g[k] for k in g.files if k.startswith("state/")}
    params = jax.tree.map(jnp.asarray, ckpt.params_from_reference(state, cfg))
    batch = {k: jnp.asarray(g[k]) for k in ("inputs", "labels", "puzzle_identifiers")}
    return g, cfg, params, batch


def tiny(**overrides):
    """A D=32 model on Sudoku's 81 cells, float32, no exploration."""
    kwargs = dict(
        vocab_size=11,
        seq_len=81,
        D=32,
        heads=2,
        T=2,
        n=2,
        N_sup=3,
        puzzle_emb_ndim=32,
        puzzle_emb_len=4,
        forward_dtype="float32",
        halt_exploration_prob=0.0,
    )
    return model.Config(**kwargs | overrides)


def batch_of(key, B=4):
    """B random Sudoku-shaped rows (tokens 1..10, labels 2..10), puzzle id 0."""
    k1, k2 = jax.random.split(key)
    return {
        "inputs": jax.random.randint(k1, (B, 81), 1, 11),
        "labels": jax.random.randint(k2, (B, 81), 2, 11),
        "puzzle_identifiers": jnp.zeros((B,), jnp.int32),
    }


def run_steps(cfg, num_devices, batches, grad_accum_steps=1):
    """Train steps on a mesh of `num_devices` devices; returns the losses and final state."""
    mesh = jax.make_mesh(
        (num_devices,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )
    B = batches[0]["inputs"].shape[0]
    with flagsaver.flagsaver(lr=1e-2, lr_warmup_steps=0, puzzle_emb_lr=1e-2):
        tx, _ = train.optimizer(train.options(), total_steps=100)
    state = train.init_state(cfg, tx, batches[0], mesh, seed=0, use_ema=True)
    train_step = train.make_train_step(
        cfg, mesh, tx, B, ema_rate=0.9, grad_accum_steps=grad_accum_steps
    )
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    losses, norms = [], []
    for batch in batches:
        state, metrics = train_step(state, jax.device_put(batch, sharding))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, jax.device_get(state)


def phases():
    """run_all.sh's phases, {"phase1": [experiment, ...], ...}, read from its arrays."""
    text = (ROOT / "run_all.sh").read_text()
    return {name: body.split() for name, body in re.findall(r"^(phase\d)=\((.*)\)$", text, re.M)}


def points(experiment, key="sweep"):
    """The runs of configs/EXPERIMENT.flags as its header lines define them (run_all.sh's
    header): the cartesian product of the `# sweep:` (or `# mini:`) line's values, one flag
    list each, less the points with every flag of the `# skip:` line. No such line: one run
    with no flags for `sweep`, none for `mini`."""
    text = (ROOT / "configs" / f"{experiment}.flags").read_text()

    def line(name):
        found = re.search(rf"^# {name}:(.*)$", text, re.M)
        return None if found is None else found.group(1).split()

    spec = line(key)
    if spec is None:
        return [[]] if key == "sweep" else []
    axes = [[f"{flag.split('=')[0]}={v}" for v in flag.split("=")[1].split(",")] for flag in spec]
    skip = set(line("skip") or [None])
    return [list(p) for p in itertools.product(*axes) if not skip <= set(p)]
