"""train.py: optimiser, schedule, EMA, data-parallel equivalence, and a short real run."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from absl.testing import flagsaver
from jax.sharding import AxisType

import bench
import ckpt
import data
import ema
import model
import train
from helpers import (
    NAN_RUN,
    ROOT,
    SMALL_MODEL,
    TESTDATA,
    TINY_RUN,
    assert_close,
    batch_of,
    run_flags,
    run_steps,
    tiny,
)


def test_adam_atan2_matches_a_numpy_transcription():
    lr, b1, b2, wd = 1e-2, 0.9, 0.95, 0.5
    tx = ema.adam_atan2(lambda t: lr * t / 3, b1, b2, wd)  # a schedule: lr depends on t
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 3)).astype(np.float32)
    params, state = jnp.asarray(p), tx.init(jnp.asarray(p))
    m = v = np.zeros_like(p, np.float64)
    p = p.astype(np.float64)
    for t in range(1, 6):
        g = rng.normal(size=p.shape)
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        lr_t = lr * t / 3
        p = p * (1 - lr_t * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr_t / (1 - b1**t) * np.arctan2(m, np.sqrt(v) / np.sqrt(1 - b2**t))
        assert_close(params, p, 1e-6, 1e-5, what=f"AdamATan2 step {t}")


def test_sign_sgd_moves_only_the_rows_in_the_batch():
    tx = ema.sign_sgd_rows(lambda t: 0.1, weight_decay=2.0)
    table = jnp.array([[1.0, -1.0], [2.0, 2.0], [3.0, 0.0]])
    grads = jnp.array([[0.5, -0.2], [0.0, 0.0], [0.0, 3.0]])
    updates, _ = tx.update(grads, tx.init(table), table, rows=jnp.array([True, True, False]))
    new = optax.apply_updates(table, updates)
    expected = [[1 * 0.8 - 0.1, -1 * 0.8 + 0.1], [2 * 0.8, 2 * 0.8], [3.0, 0.0]]
    assert_close(new, expected, 1e-6, what="SignSGD rows")  # row 1 decays, row 2 is untouched


def test_lr_schedule_warmup_then_constant_or_cosine():
    constant = ema.lr_schedule(1e-4, warmup_steps=10, total_steps=110, min_ratio=1.0)
    cosine = ema.lr_schedule(1e-4, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert_close(
        [constant(s) for s in (0, 1, 5, 10, 60, 110)], [0, 1e-5, 5e-5, 1e-4, 1e-4, 1e-4], 0, 1e-6
    )
    assert_close([cosine(s) for s in (10, 60, 110)], [1e-4, 0.55e-4, 0.1e-4], 0, 1e-6)


def test_ema_update():
    shadow, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}
    assert_close(ema.update(shadow, params, 0.9)["w"], [1.2, 1.8], 1e-7)
    assert ema.init(params)["w"] is not params["w"]  # a copy: donation-safe


@pytest.mark.parametrize("mlp_t", [True, False])
def test_data_parallel_equals_single_device(mlp_t):
    """8 devices, each with an eighth of the batch: the same losses, gradient norms, params,
    EMA and carry as 1 device (exploration on, so its draws must not depend on the split)."""
    cfg = tiny(mlp_t=mlp_t, pos_encodings="none" if mlp_t else "rope", halt_exploration_prob=0.5)
    batches = [batch_of(jax.random.key(i), B=16) for i in range(3)]
    one = run_steps(cfg, 1, batches)
    four = run_steps(cfg, 8, batches)
    assert_same_training(four, one)


def assert_same_training(a, b):
    """Two run_steps results: the same losses, gradient norms and final state."""
    assert_close(a[0], b[0], 1e-6, 1e-5, what="losses")
    assert_close(a[1], b[1], 1e-6, 1e-4, what="grad norms")
    leaves = zip(jax.tree_util.tree_leaves_with_path(a[2]), jax.tree.leaves(b[2]), strict=True)
    for (path, x), y in leaves:
        if jnp.issubdtype(x.dtype, jnp.floating):  # the recursion amplifies rounding in the carry
            atol = 5e-4 if "carry" in jax.tree_util.keystr(path) else 1e-5
            assert_close(x, y, atol, 1e-4, what=jax.tree_util.keystr(path))
        elif not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert (np.asarray(x) == np.asarray(y)).all(), jax.tree_util.keystr(path)


def test_gradient_accumulation_equals_one_batch():
    """--grad_accum_steps=4 on 2 devices (8 rows each, 4 chunks of 2 run in turn): the same
    training as the whole batch at once, and the gradients still cross devices once, as
    all-reduces of about the parameters' bytes (not once per chunk)."""
    cfg = tiny(halt_exploration_prob=0.5)
    batches = [batch_of(jax.random.key(i), B=16) for i in range(3)]
    assert_same_training(run_steps(cfg, 2, batches, grad_accum_steps=4), run_steps(cfg, 2, batches))

    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx, _ = train.optimizer(train.options(), total_steps=100)
    state = train.init_state(cfg, tx, batches[0], mesh, seed=0, use_ema=True)
    step = train.make_train_step(cfg, mesh, tx, 16, ema_rate=0.9, grad_accum_steps=4)
    ops, _ = bench.collectives(step.lower(state, batches[0]).compile().as_text())
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    assert param_bytes <= ops["all-reduce"][1] <= 1.1 * param_bytes + 4096, (ops, param_bytes)


def test_evaluation_on_any_device_count_counts_every_example_once(tmp_path):
    """--eval_batch_size=10 over 25 test puzzles on 3, 4 and 8 devices (batches rounded up
    to 12, 12 and 16 rows, the last one short and padded): the same metrics as 1 device."""
    path = data.build_builtin(str(tmp_path), 4, 25, 40, 45, 0, seed=0)
    test_ds = data.load([path], "test")
    cfg = tiny(num_puzzle_identifiers=test_ds["meta"]["num_puzzle_identifiers"])
    params = model.init_params(jax.random.key(0), cfg)
    results = {}
    for n in (1, 3, 4, 8):
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
        )
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        B = data.eval_batch_size(10, n)
        assert B % n == 0 and 10 <= B < 10 + n
        eval_step = train.make_eval_step(cfg, mesh)
        batches = data.eval_batches(test_ds, B, None, data.process_rows(sharding, B))
        results[n] = train.evaluate(
            eval_step, params, batches, functools.partial(jax.device_put, device=sharding)
        )
    assert results[1]["eval/count"] == 25
    for n in (3, 4, 8):
        assert results[n].keys() == results[1].keys()
        for k, v in results[1].items():
            assert_close(results[n][k], v, 1e-5, what=f"{k} on {n} devices")


# The short run's losses and test metrics as tests/testdata/loss_curve.json has them: a
# change to train.py, model.py or kernels.py that is not meant to change training keeps them
# (to rounding across CPUs). TRMX_WRITE_GOLDEN=1 rewrites the file from this machine's run.
GOLDEN_CURVE = TESTDATA / "loss_curve.json"
CURVE_KEYS = ("train/loss", "train/lm_loss", "train/q_halt_loss", "eval/accuracy",
              "eval/exact_accuracy", "eval/q_halt_accuracy", "eval/halted_steps")  # fmt: skip


def test_short_training_run_lowers_the_loss(tmp_path):
    """The real entry point on built-in data and 4 devices: the loss falls, every file is
    written, and the 20 test puzzles are evaluated in batches of 6 rounded up to 8 rows. The
    run goes through a two-stage curriculum, annealed exploration and gradient accumulation,
    and its loss curve is the golden one."""
    cmd = [sys.executable, "train.py", f"--builtin_dir={tmp_path}", f"--workdir={tmp_path / 'run'}"]
    cmd += run_flags(
        TINY_RUN,
        halt_max_steps=2,
        lr_warmup_steps=5,
        epochs=16,
        eval_interval=8,
        log_every=10,
        eval_batch_size=6,
        curriculum_steps=20,
        curriculum_start_H_cycles=1,
        curriculum_start_L_cycles=1,
        halt_exploration_final=0.0,
        grad_accum_steps=2,
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=600, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps/s" in out.stdout and "ETA" in out.stdout and "eval @ 60" in out.stdout
    assert "evaluation batches of 8 puzzles (4 devices)" in out.stdout
    assert "| 20 examples in" in out.stdout
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_losses = [m["train/loss"] for m in logs if "train/loss" in m]
    assert train_losses[-1] < 0.8 * train_losses[0], train_losses
    evals = [m for m in logs if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [30, 60]
    assert {"eval/exact_accuracy_step1", "eval/exact_accuracy_step2"} <= set(evals[-1])
    assert "--hidden_size=32" in (tmp_path / "run" / "flags.txt").read_text()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    curve = [{k: m[k] for k in ("step", *CURVE_KEYS) if k in m} for m in logs]
    if os.environ.get("TRMX_WRITE_GOLDEN"):
        GOLDEN_CURVE.write_text(json.dumps(curve, indent=1) + "\n")
    golden_curve = json.loads(GOLDEN_CURVE.read_text())
    assert [m.keys() for m in curve] == [m.keys() for m in golden_curve]
    for got, want in zip(curve, golden_curve, strict=True):
        for k in CURVE_KEYS:
            if k in want:
                assert_close(got[k], want[k], 1e-3, 1e-3, what=f"{k} at step {want['step']}")


def test_nan_loss_stops_the_run_with_the_step(tmp_path):
    cmd = [sys.executable, "train.py", *run_flags(NAN_RUN), f"--builtin_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    assert "The loss became NaN/Inf at step" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data_paths=/nonexistent"], "No dataset at /nonexistent/train/dataset.json"),
        (["--global_batch_size=6"], "--global_batch_size=6 does not divide over 4 devices"),
        (["--H_cycles=0"], r"flag --H_cycles=0: 0 is not a positive integer"),
        (["--global_batch_size=0"], r"flag --global_batch_size=0: 0 is not a positive integer"),
        (["--lr=-1"], r"flag --lr=-1: -1.0 is not a non-negative number"),
        (["--builtin_blanks=50,40"], r"flag --builtin_blanks=.*MIN <= MAX"),
        (
            ["--init_from={tmp}/garbage.pt", "--builtin_train=4", "--builtin_test=4"],
            r"--init_from=.*garbage.pt: not a trmx checkpoint folder nor a PyTorch state dict",
        ),
        (["--workdir={tmp}/garbage.pt/run"], r"--workdir=.*: cannot create .*: Not a directory"),
        (["--eval_trajectories=0,4"], "--eval_trajectories=0,4: positive integers"),
        (["--eval_halt_max_steps=16,x"], "--eval_halt_max_steps=16,x: positive integers"),
        (
            ["--grad_accum_steps=3", "--global_batch_size=8", "--builtin_train=4"],
            r"--grad_accum_steps=3 must be >= 1 and divide the 2 rows of each device",
        ),
    ],
)
def test_user_mistakes_are_reported_without_a_traceback(tmp_path, args, message):
    """One line naming the flag (and the path) and what is wrong, exit code 1."""
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    cmd = [sys.executable, "train.py", f"--builtin_dir={tmp_path}", *args]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    assert out.returncode == 1
    assert re.search(message, out.stderr), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_every_numeric_flag_has_its_range_checked_when_parsed():
    """A value out of range of any numeric flag of train.py is refused when the flags are
    parsed, in one line with the flag's name and the value (absl prints it and exits 1;
    the subprocess cases above show it for a few)."""
    checked = 0
    for name in train.TRAIN_FLAGS:
        flag = flags.FLAGS[name]
        if not isinstance(flag.parser, (flags.IntegerParser, flags.FloatParser)):
            continue
        lower, upper = flag.parser.lower_bound, flag.parser.upper_bound
        if name == "seed":  # any integer seeds the run
            assert lower is None and upper is None
            continue
        assert lower is not None, f"--{name} has no lower bound"
        for bad in [lower - 1] + ([upper + 1] if upper is not None else []):
            text = str(bad)
            with pytest.raises(flags.IllegalFlagValueError, match=rf"^flag --{name}={text}: "):
                flag.parse(text)
            checked += 1
    assert checked >= 45, checked


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("linear", 2.0), ("sqrt", 2**0.5)])
def test_lr_scaling_rules(rule, factor):
    """Batch 1536 against the base 768: lr and puzzle_emb_lr both scale by the rule."""
    with flagsaver.flagsaver(global_batch_size=1536, lr_scaling=rule, lr_warmup_steps=10):
        tx, lr = train.optimizer(train.options(), total_steps=100)
    assert_close(lr(10), 1e-4 * factor, 0, 1e-6)
    table = {"puzzle_emb": jnp.ones((1, 4))}
    updates, _ = tx.update(table, tx.init(table), table, rows=jnp.ones(1, bool))
    # SignSGD at step 1 of the 10-step warm-up: -(lr / 10) * (wd * w + sign(g)), wd = w = g = 1
    assert_close(updates["puzzle_emb"], np.full((1, 4), -2e-5 * factor), 0, 1e-5)


def test_no_recompilation_after_the_first_step():
    """New batches, an evolving carry and EMA: the train and eval steps compile once."""
    compiles = []

    def listener(event, *_, **__):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        counts = compile_counts(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[0] > 0 and counts[1:] == [counts[0]] * 4, counts


def compile_counts(compiles):
    """Compilations so far after each of 5 train steps (each followed by an evaluation)."""
    cfg = tiny(halt_exploration_prob=0.5)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batches = [jax.device_put(batch_of(jax.random.key(i), B=8), sharding) for i in range(5)]
    tx, _ = train.optimizer(train.options(), total_steps=100)
    state = train.init_state(cfg, tx, batches[0], mesh, seed=0, use_ema=True)
    train_step = train.make_train_step(cfg, mesh, tx, 8, ema_rate=0.9)
    eval_step = train.make_eval_step(cfg, mesh)
    counts = []
    for batch in batches:
        state, metrics = train_step(state, batch)
        weights = state["ema"] | {"puzzle_emb": state["params"]["puzzle_emb"]} | state["buffers"]
        jax.block_until_ready(eval_step(weights, batch))
        counts.append(len(compiles))
    return counts


RETAIN_PROBE = """
import resource, sys
import numpy as np
import train
if sys.argv[1] == "on":
    assert train.retain_host_memory()
np.ones(2**25)  # 256 MiB, written and freed: larger than glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(2**25)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retain_host_memory_reuses_freed_pages():
    """With `retain_host_memory`, a large block freed and allocated again costs no page
    faults (its pages stay mapped); without it, every page of it faults in again."""
    faults = {}
    for mode in ("on", "off"):
        cmd = [sys.executable, "-c", RETAIN_PROBE, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        faults[mode] = int(out.stdout.split()[-1])
    # 256 MiB is 65536 pages of 4 KiB, or 128 of 2 MiB where transparent huge pages are on.
    assert faults["on"] < 16 and faults["off"] >= 128, faults


# ----------------------------------------------------------------------------- ARC


ARC_TINY = TESTDATA / "arc_tiny" / "arc-tiny"
ARC_MODEL = {  # a D=16 attention model on ARC's 900 cells: 2 supervision steps of T=1, n=1
    **SMALL_MODEL, "mlp_t": "false", "pos_encodings": "rope", "puzzle_emb_len": 1,
}  # fmt: skip


def arc_stand_in(tmp_path):
    """An ARC dataset built from tests/testdata/arc_tiny (3 augmentations), a model config
    for it, and a stand-in for an official checkpoint of that config: its state dict under
    the reference's names (numpy), random weights and a random puzzle table (a zero one
    would hide a wrong row mapping)."""
    path = data.build_arc(
        str(ARC_TINY), str(tmp_path / "arc"), ["training", "evaluation", "concept"],
        ["evaluation"], num_aug=3, seed=42,
    )  # fmt: skip
    meta = data.load([path], "train")["meta"]
    cfg = tiny(
        seq_len=900, vocab_size=12, D=16, T=1, n=1, N_sup=2, mlp_t=False, pos_encodings="rope",
        puzzle_emb_ndim=16, puzzle_emb_len=1, num_puzzle_identifiers=meta["num_puzzle_identifiers"],
    )  # fmt: skip
    params = model.init_params(jax.random.key(1), cfg)
    params["puzzle_emb"] = jax.random.normal(jax.random.key(2), params["puzzle_emb"].shape)
    state = {}
    for path_, (key, transpose) in ckpt.reference_names(cfg).items():
        value = np.asarray(ckpt._get(params, path_))
        state[f"_orig_mod.model.{key}"] = value.T if transpose else value
    return path, cfg, state


def arc_votes_by_predict(path, cfg, params):
    """pass@K and submission from model.predict on every test example in one batch: the
    straightforward computation the evaluation's batched, sharded path must agree with."""
    test = data.load([path], "test")
    puzzle_of = np.searchsorted(test["puzzle_indices"], np.arange(len(test["inputs"])), "right")
    ids = np.asarray(test["puzzle_identifiers"])[puzzle_of - 1]
    logits, q_halt = model.predict(params, cfg, np.asarray(test["inputs"]), ids)
    votes = data.ArcVotes(path)
    votes.add(ids, np.asarray(test["inputs"]), np.argmax(logits, -1), np.asarray(q_halt))
    return votes.result()


def test_arc_evaluation_votes_with_every_answer_on_any_device_count(tmp_path):
    """An official ARC checkpoint's weights (the stand-in, through ckpt.load_torch) scored by
    the evaluation (eval step with outputs, gathered, padding rows dropped) on 1 and 3
    devices in batches of 5 give the scores and submission of model.predict on all test
    examples at once; the puzzle table's rows matter (zeroing it changes the answers)."""
    path, cfg, state = arc_stand_in(tmp_path)
    params = ckpt.load_torch(state, cfg)
    expected = arc_votes_by_predict(path, cfg, params)
    test = data.load([path], "test")
    for n in (1, 3):
        mesh = train.data_mesh(jax.devices()[:n])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        B = data.eval_batch_size(5, n)
        votes = data.ArcVotes(path)
        log = train.evaluate(
            train.make_eval_step(cfg, mesh, outputs=True), params,
            data.eval_batches(test, B, None, data.process_rows(sharding, B)),
            functools.partial(jax.device_put, device=sharding), votes=votes,
        )  # fmt: skip
        assert log["eval/count"] == len(test["inputs"])
        assert votes.result() == expected, f"{n} devices"
    blank = params | {"puzzle_emb": np.zeros_like(params["puzzle_emb"])}
    assert arc_votes_by_predict(path, cfg, blank)[1] != expected[1]


def test_arc_run_trains_evaluates_and_writes_a_submission(tmp_path):
    """train.py on an ARC dataset (2 devices): every evaluation logs eval/ARC/pass@K and
    writes a Kaggle submission.json with two attempts per test input of every test puzzle."""
    path, _, _ = arc_stand_in(tmp_path)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--data_paths={path}", f"--workdir={workdir}"]
    cmd += run_flags(ARC_MODEL, global_batch_size=8, epochs=2, eval_interval=1, log_every=2)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    evals = [m for m in map(json.loads, (workdir / "metrics.jsonl").open()) if "eval/count" in m]
    assert len(evals) == 2
    for m in evals:
        assert {f"eval/ARC/pass@{k}" for k in data.ARC_PASS_KS} <= set(m)
        assert 0 <= m["eval/ARC/pass@1"] <= m["eval/ARC/pass@2"] <= m["eval/ARC/pass@1000"] <= 1
        submission = json.loads(
            (workdir / "arc" / f"eval_step_{m['step']:08d}" / "submission.json").read_text()
        )
        puzzles = json.loads((tmp_path / "arc" / "test_puzzles.json").read_text())
        assert submission.keys() == puzzles.keys()
        for name, answers in submission.items():
            assert len(answers) == len(puzzles[name]["test"])
            for attempts in answers:
                assert attempts.keys() == {"attempt_1", "attempt_2"}
                for grid in attempts.values():  # a grid of colours (or empty: nothing read)
                    assert all(len(r) == len(grid[0]) and set(r) <= set(range(10)) for r in grid)
    assert "eval ARC @" in out.stdout


def test_official_arc_checkpoint_file_is_evaluated_with_init_from(tmp_path):
    """--eval_only --init_from=<the stand-in saved by torch.save>: the logged pass@K and the
    submission are model.predict's on those weights. Needs torch (not a trmx dependency)."""
    torch = pytest.importorskip("torch")
    path, cfg, state = arc_stand_in(tmp_path)
    torch.save({k: torch.tensor(v) for k, v in state.items()}, tmp_path / "step_1000")
    scores, submission = arc_votes_by_predict(path, cfg, ckpt.load_torch(state, cfg))
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--data_paths={path}", f"--workdir={workdir}"]
    cmd += ["--eval_only", f"--init_from={tmp_path / 'step_1000'}", "--eval_batch_size=7"]
    cmd += run_flags(ARC_MODEL)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (m,) = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert {k: m[f"eval/ARC/{k}"] for k in scores} == scores
    written = json.loads((workdir / "arc" / "eval_step_00000000" / "submission.json").read_text())
    assert written == submission
