"""Train a Tiny Recursive Model on Sudoku, data parallel over every device.

  # The default CPU job: built-in puzzles, a small TRM, 4-9 minutes on 2 cores:
  python train.py --flagfile=configs/sudoku_cpu.flags --workdir=runs/sudoku_cpu
  # The paper's Sudoku-Extreme MLP run (build the data first, see data.py):
  python train.py --flagfile=configs/sudoku_mlp.flags --workdir=runs/sudoku_mlp
  # Flags after the flagfile override it:
  python train.py --flagfile=configs/sudoku_mlp.flags --H_cycles=2 --workdir=runs/T2

Flag names are the reference's hyperparameter names (pretrain.py, config/arch/trm.yaml), so
`python pretrain.py key=value` becomes `python train.py --key=value`; the defaults are its
Sudoku-Extreme MLP run. Without --data_paths, built-in puzzles are generated (data.py).

The story of `main`: the flags are read once (`options`); `setup` makes the model, the
optimiser and the jitted steps of them; `restore` finds where the run starts; `train` runs
the steps, logging, evaluating and checkpointing; an --eval_only run only evaluates.
"""

import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
import data
import ema
import kernels
import model

_ABSL_FLAGS = set(flags.FLAGS)  # defined before train.py's own
# Every numeric flag's range, checked when the flags are parsed: a bad value ends the run with
# one line naming the flag and the value (absl: "flag --lr=-1: -1.0 is not a non-negative ...").
POS, NONNEG, TWO = dict(lower_bound=1), dict(lower_bound=0), dict(lower_bound=2)
PROB = dict(lower_bound=0.0, upper_bound=1.0)
# data
flags.DEFINE_list("data_paths", [], "dataset folders (data.py); empty = built-in")
flags.DEFINE_integer("builtin_train", 2000, "built-in data: training puzzles", **POS)
flags.DEFINE_integer("builtin_test", 1000, "built-in data: held-out test puzzles", **POS)
flags.DEFINE_enum("builtin_task", "sudoku", ["sudoku", "maze"], "built-in data: which puzzles")
flags.DEFINE_list("builtin_blanks", ["40", "50"], "built-in Sudoku: min,max blanks")
flags.DEFINE_list("builtin_maze", ["15", "20"], "built-in mazes: side,fewest steps from S to G")
flags.register_validator(
    "builtin_maze",
    lambda v: len(v) == 2 and all(x.isdigit() for x in v) and int(v[0]) >= 5 and int(v[1]) >= 1,
    "two counts SIDE,MIN_PATH with SIDE >= 5, MIN_PATH >= 1",
)
flags.register_validator(
    "builtin_blanks",
    lambda v: len(v) == 2 and all(x.isdigit() for x in v) and int(v[0]) <= int(v[1]) <= 64,
    "two counts MIN,MAX with MIN <= MAX <= 64 (a Sudoku with more blanks has no unique answer)",
)
flags.DEFINE_integer("builtin_aug", 100, "built-in: augmentations per puzzle", **NONNEG)
flags.DEFINE_string("builtin_dir", "data", "where built-in datasets are cached")
flags.DEFINE_integer("train_puzzles", None, "train on the first N training puzzles only", **POS)
flags.DEFINE_integer("train_aug", None, "augmented variants used per training puzzle", **NONNEG)
# schedule
flags.DEFINE_integer("global_batch_size", 768, "rows per step, all devices", **POS)
flags.DEFINE_enum("lr_scaling", "none", ["none", "linear", "sqrt"], "lrs x batch/base")
flags.DEFINE_integer("base_batch_size", 768, "batch the lrs are given for", **POS)
flags.DEFINE_integer("epochs", 50000, "epochs (one draw per puzzle group each)", **POS)
flags.DEFINE_integer("eval_interval", 5000, "evaluate every this many epochs", **POS)
flags.DEFINE_integer("max_steps", None, "stop early (the LR schedule is unchanged)", **POS)
flags.DEFINE_integer("eval_max_examples", None, "cap on test examples", **POS)
flags.DEFINE_integer("eval_batch_size", None, "default: global_batch_size", **POS)
flags.DEFINE_integer("log_every", 100, "steps between progress lines and metrics", **POS)
# model (reference arch keys)
flags.DEFINE_integer("hidden_size", 512, "D", **POS)
flags.DEFINE_integer("num_heads", 8, "attention heads", **POS)
flags.DEFINE_float("expansion", 4.0, "SwiGLU expansion", **NONNEG)
flags.DEFINE_integer("H_cycles", 3, "T: outer cycles per supervision step", **POS)
flags.DEFINE_integer("L_cycles", 6, "n: z updates per cycle", **POS)
flags.DEFINE_integer("L_layers", 2, "blocks in the network", **POS)
flags.DEFINE_bool("mlp_t", True, "MLP over the sequence instead of attention")
flags.DEFINE_enum("pos_encodings", "none", ["rope", "learned", "none"], "")
flags.DEFINE_integer("puzzle_emb_ndim", None, "default: hidden_size", **NONNEG)
flags.DEFINE_integer("puzzle_emb_len", 16, "prefix positions", **NONNEG)
flags.DEFINE_integer("halt_max_steps", 16, "N_sup: max supervision steps", **POS)
flags.DEFINE_float("halt_exploration_prob", 0.1, "", **PROB)
# test-time compute (model.TestTimeCompute): the largest of each list runs, all are reported
flags.DEFINE_list("eval_halt_max_steps", None, "N_sup at evaluation, e.g. 16,32,64")
flags.DEFINE_list("eval_trajectories", None, "trajectories per puzzle, e.g. 1,4,16")
flags.DEFINE_float("eval_noise", 0.3, "std of the noise on trajectories 1..K-1 (PTRM)", **NONNEG)
flags.DEFINE_enum("eval_noise_state", "z", ["z", "y", "both"], "the state it perturbs")
flags.DEFINE_float("rms_norm_eps", 1e-5, "", **NONNEG)
flags.DEFINE_float("rope_theta", 10000.0, "", **POS)
flags.DEFINE_enum("forward_dtype", "bfloat16", list(model.DTYPES), "")
flags.DEFINE_bool("no_ACT_continue", True, "False: add the Q-continue loss")
flags.DEFINE_enum("loss_type", "stablemax", ["stablemax", "softmax"], "")
# novel: curriculum recursion, compute-aware halting, checkpoint averaging
flags.DEFINE_integer(
    "curriculum_steps", 0, "grow T, n to H_cycles, L_cycles in this many steps", **NONNEG
)
flags.DEFINE_integer("curriculum_start_H_cycles", 1, "T at step 0", **POS)
flags.DEFINE_integer("curriculum_start_L_cycles", 2, "n at step 0", **POS)
flags.DEFINE_integer(
    "curriculum_stages", 3, "(T, n) stages, the last the final (a compile each)", **TWO
)
flags.DEFINE_float(
    "halt_step_penalty", 0.0, "lambda: the value one more step costs (Q-continue)", **NONNEG
)
flags.DEFINE_float("halt_exploration_final", None, "anneal halt_exploration_prob to this", **PROB)
flags.DEFINE_integer(
    "halt_exploration_anneal_steps", None, "over these steps (default: all)", **POS
)
flags.DEFINE_integer(
    "swa_start", None, "also evaluate the weights' running mean from this step", **NONNEG
)
flags.DEFINE_integer(
    "average_checkpoints", None, "--eval_only: the newest K checkpoints' mean", **POS
)
flags.DEFINE_enum("kernel", "auto", ["auto", "pallas", "xla"], "MLP-mixer block (auto: by chip)")
flags.DEFINE_bool("interpret", False, "run the Pallas kernel in its interpreter")
flags.DEFINE_integer("grad_accum_steps", 1, "chunks of each device's rows, a backward each", **POS)
# optimizer
flags.DEFINE_enum("optimizer", "adam_atan2", ["adam_atan2", "adamw", "lion"], "")
flags.DEFINE_float("lr", 1e-4, "peak learning rate", **NONNEG)
flags.DEFINE_float("lr_min_ratio", 1.0, "cosine floor / peak; 1 = constant", **PROB)
flags.DEFINE_integer("lr_warmup_steps", 2000, "linear warm-up from 0", **NONNEG)
flags.DEFINE_float("beta1", 0.9, "", **PROB)
flags.DEFINE_float("beta2", 0.95, "", **PROB)
flags.DEFINE_float("weight_decay", 1.0, "decoupled, times lr", **NONNEG)
flags.DEFINE_float("puzzle_emb_lr", 1e-4, "SignSGD lr of the puzzle table", **NONNEG)
flags.DEFINE_float("puzzle_emb_weight_decay", 1.0, "", **NONNEG)
# ema
flags.DEFINE_bool("ema", True, "evaluate an EMA of the weights")
flags.DEFINE_float("ema_rate", 0.999, "", **PROB)
# checkpoints
flags.DEFINE_integer("ckpt_every", 1000, "steps between checkpoints (also at every eval)", **NONNEG)
flags.DEFINE_integer("keep", 3, "newest checkpoints kept", **POS)
flags.DEFINE_bool("keep_best", False, "also keep the best by eval exact accuracy")
flags.DEFINE_string("init_from", None, "start from a PyTorch TRM checkpoint or a run of ours")
flags.DEFINE_enum("init_from_weights", "ema", ["ema", "raw"], "which weights of a run of ours")
flags.DEFINE_bool("eval_only", False, "evaluate the restored/--init_from weights")
# system
flags.DEFINE_integer("seed", 0, "params, data order and exploration")
flags.DEFINE_string("workdir", None, "flags.txt, metrics.jsonl, TensorBoard events")
flags.DEFINE_bool("distributed", False, "multi-host: jax.distributed finds the hosts (TPU)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
flags.DEFINE_integer("num_processes", None, "processes in the run", **POS)
flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1", **NONNEG)
flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for every process to join", **POS)
flags.DEFINE_integer("peer_timeout", 60, "seconds before a silent process counts as lost", **POS)
flags.DEFINE_bool("retain_host_memory", True, "keep freed host memory mapped (glibc malloc)")


TRAIN_FLAGS = tuple(sorted(set(flags.FLAGS) - _ABSL_FLAGS))


def options(**changes) -> types.SimpleNamespace:
    """The value of every train.py flag (o.lr, o.global_batch_size, ...), read once and
    passed down, with `changes` (bench.py and the tests vary a few)."""
    unknown = set(changes) - set(TRAIN_FLAGS)
    if unknown:
        raise TypeError(f"not train.py flags: {sorted(unknown)}")
    return types.SimpleNamespace(**{k: flags.FLAGS[k].value for k in TRAIN_FLAGS} | changes)


def UserError(message):  # noqa: N802 (raised like an exception class)
    """A user's mistake: one clear line on stderr and exit code 1, no traceback."""
    return SystemExit(f"train.py: error: {message}")


def retain_host_memory() -> bool:
    """Make glibc's malloc keep the memory it frees, so that each step reuses pages that
    are already mapped; call it before JAX starts its threads. Returns False (and changes
    nothing) where the C library has no `mallopt`.

    XLA:CPU allocates a step's scratch anew at every execution; by default glibc serves it
    from a fresh mmap and unmaps it after, so every step page-faults all of it back in
    (docs/PERFORMANCE.md). Settings: one heap for all threads, no mmap, never trim, grow 1 GiB
    at a time. Cost: the process keeps its peak host memory until it exits."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8  # <malloc.h>
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 2**30))
    return all([mallopt(option, value) == 1 for option, value in settings])  # each one tried


# ----------------------------------------------------------------------------- model, schedules


def model_config(o, meta, platform=None) -> model.Config:
    """The model the flags describe (model.FLAG_KEYS: the flags that set a Config field), for
    a dataset's metadata (vocabulary, length, puzzle identifiers) and the platform compiled
    for (default: this machine's), with its --kernel choice (kernels.choose)."""
    values = {name: getattr(o, name) for name in model.FLAG_KEYS if hasattr(o, name)}
    data = {k: meta[k] for k in ("vocab_size", "seq_len", "num_puzzle_identifiers")}
    cfg = model.Config.from_flags(values | data, kernel="xla")  # "auto" is no Config value
    platform = platform or jax.devices()[0].platform
    kernel = kernels.choose(
        o.kernel, platform, mlp_t=cfg.mlp_t, dtype=o.forward_dtype, interpret=o.interpret,
        fits=fits_vmem(cfg),
    )  # fmt: skip
    return dataclasses.replace(cfg, kernel=kernel)


def fits_vmem(cfg) -> bool:
    """Whether the model's fused MLP-mixer block fits the VMEM of the TPU compiled for."""
    widths = (model.swiglu_width(cfg.L, cfg.expansion), model.swiglu_width(cfg.D, cfg.expansion))
    return kernels.fits_vmem(cfg.L, cfg.D, *widths, cfg.dtype)


def curriculum(o, cfg, step):
    """The (T, n) of the model trained at `step` under curriculum recursion: a staircase of
    --curriculum_stages stages from (--curriculum_start_H_cycles, --curriculum_start_L_cycles)
    to the config's (T, n), stage k of S starting at step k * K / (S - 1) for K =
    --curriculum_steps; the final stage from step K on. A staircase, not a ramp, so that the
    train step compiles once per stage instead of once per step. Without a curriculum, (T, n).
    """
    K, S = o.curriculum_steps, o.curriculum_stages
    if not K:
        return cfg.T, cfg.n
    k = min(S - 1, step * (S - 1) // K)
    T0, n0 = o.curriculum_start_H_cycles, o.curriculum_start_L_cycles
    return (round(T0 + (cfg.T - T0) * k / (S - 1)), round(n0 + (cfg.n - n0) * k / (S - 1)))


def exploration_schedule(o, total_steps):
    """step -> halt exploration probability: --halt_exploration_prob, annealed linearly to
    --halt_exploration_final over --halt_exploration_anneal_steps (default: the whole run);
    None when not annealed (the config's constant is used)."""
    final, start = o.halt_exploration_final, o.halt_exploration_prob
    if final is None:
        return None
    steps = o.halt_exploration_anneal_steps or total_steps
    return lambda step: start + (final - start) * jnp.minimum(step / max(1, steps), 1.0)


def check_schedules(o, cfg):
    """A clear error for a curriculum that does not grow to the model's (T, n) (the flags'
    own ranges are checked when they are parsed)."""
    T0, n0 = o.curriculum_start_H_cycles, o.curriculum_start_L_cycles
    if o.curriculum_steps and not (T0 <= cfg.T and n0 <= cfg.n):
        raise UserError(
            f"--curriculum_start_H_cycles={T0}, --curriculum_start_L_cycles={n0}: each must be "
            f"in [1, final] (--H_cycles={cfg.T}, --L_cycles={cfg.n})"
        )


# ----------------------------------------------------------------------------- optimizer


def optimizer(o, total_steps):
    """(optax transformation, step -> lr): AdamATan2 (or AdamW, Lion) on the weights,
    row-sparse SignSGD on the puzzle table; both lrs scaled by --lr_scaling (global batch /
    --base_batch_size, or its square root)."""
    sched = functools.partial(
        ema.lr_schedule,
        warmup_steps=o.lr_warmup_steps,
        total_steps=total_steps,
        min_ratio=o.lr_min_ratio,
    )
    ratio = o.global_batch_size / o.base_batch_size
    scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.lr_scaling]
    lr = sched(o.lr * scale)
    b1, b2, wd = o.beta1, o.beta2, o.weight_decay
    if o.optimizer == "adam_atan2":
        dense = ema.adam_atan2(lr, b1, b2, wd)
    elif o.optimizer == "lion":  # optax counts from 0, the reference's schedule from 1
        dense = optax.lion(lambda c: lr(c + 1), b1, b2, weight_decay=wd)
    else:
        dense = optax.adamw(lambda c: lr(c + 1), b1, b2, eps=1e-8, weight_decay=wd)
    puzzle = ema.sign_sgd_rows(sched(o.puzzle_emb_lr * scale), o.puzzle_emb_weight_decay)
    return optax.partition(
        {"dense": dense, "puzzle": puzzle},
        lambda params: {k: "puzzle" if k == "puzzle_emb" else "dense" for k in params},
    ), lr


# ----------------------------------------------------------------------------- steps


def state_layout(cfg, tx, first_batch, mesh, seed, use_ema, use_swa=False):
    """(init, shapes, shardings) of the whole train state: init(first_batch) builds it (the
    same on every host); it is replicated over the mesh, except the carry, split by rows like
    the batch. `first_batch` may hold arrays or jax.ShapeDtypeStructs (shapes only)."""

    def init(batch):
        params = model.init_params(jax.random.key(seed), cfg)
        buffers = {k: params.pop(k) for k in model.BUFFERS}
        weights = {k: v for k, v in params.items() if k != "puzzle_emb"}
        return {
            "step": jnp.zeros([], jnp.int32),
            "params": params,
            "buffers": buffers,
            "opt": tx.init(params),
            "ema": ema.init(weights) if use_ema else None,
            "swa": ema.running_mean_init(weights) if use_swa else None,
            "rng": jax.random.key(seed + 1),
            "nan_step": jnp.full([], -1, jnp.int32),
            "carry": model.initial_carry(cfg, batch),
        }

    shapes = jax.eval_shape(init, first_batch)
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes)
    shardings["carry"] = jax.tree.map(lambda _: NamedSharding(mesh, P("data")), shapes["carry"])
    return init, shapes, shardings


def init_state(cfg, tx, first_batch, mesh, seed, use_ema, use_swa=False):
    """The whole train state, built on the devices by one jitted function (`state_layout`)."""
    init, _, shardings = state_layout(cfg, tx, first_batch, mesh, seed, use_ema, use_swa)
    return jax.jit(init, out_shardings=shardings)(first_batch)


def varying(tree):
    """Arrays replicated over the mesh marked as varying over its 'data' axis (inside a
    shard_map): a weight's gradient then stays per-device through the model (hand-written
    VJPs included) and is summed over devices once, where the caller chooses."""
    return jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), tree)


def loss_and_grads(cfg, mesh, global_batch_size, chunks=1):
    """(params, buffers, carry, batch, min_steps) -> ((loss, (carry, metric sums)), grads)
    of one train step, data parallel: each device runs the model on its rows; the loss, the
    metric sums and the gradients are summed over devices once.

    With `chunks` > 1, each device's rows run as that many chunks one after another (a
    scan), each chunk's backward before the next one's forward: the activation memory of a
    chunk, the result of one batch (the loss is a sum over rows; rounding aside)."""
    rows, whole = P("data"), P()

    def loss_of(params, carry, batch, min_steps):  # on one device's rows
        return model.loss_fn(
            params, cfg, carry, batch, min_steps, train=True, global_batch_size=global_batch_size
        )

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(whole, whole, rows, rows, rows),
        out_specs=(whole, (rows, whole)),
    )  # fmt: skip
    def loss_dp(params, buffers, carry, batch, min_steps):
        loss, (carry, metrics, _) = loss_of(varying(params | buffers), carry, batch, min_steps)
        return jax.lax.psum(loss, "data"), (carry, jax.lax.psum(metrics, "data"))

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(whole, whole, rows, rows, rows),
        out_specs=((whole, (rows, whole)), whole),
    )  # fmt: skip
    def accumulated(params, buffers, carry, batch, min_steps):
        params, buffers = varying(params), varying(buffers)

        def one(xs):  # (loss, metric sums, grads) and the new carry of one chunk
            grad_fn = jax.value_and_grad(lambda p, *xs: loss_of(p | buffers, *xs), has_aux=True)
            (loss, (carry, metrics, _)), grads = grad_fn(params, *xs)
            return (loss, metrics, grads), carry

        (loss, metrics, grads), carry = accumulate(one, (carry, batch, min_steps), chunks)
        loss, metrics, grads = jax.lax.psum((loss, metrics, grads), "data")
        return (loss, (carry, metrics)), grads

    # One chunk: the gradient is taken outside the shard_map, of the summed loss.
    return jax.value_and_grad(loss_dp, has_aux=True) if chunks == 1 else accumulated


def accumulate(one, xs, chunks):
    """one(xs) -> (sums, carry) run on `chunks` slices of the rows of xs in turn (a scan):
    the sums added up over the chunks, the carries put back together."""

    def split(a):  # (rows, ...) -> (chunks, rows / chunks, ...)
        return a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])

    def chunk(total, xs):
        sums, carry = one(xs)
        return jax.tree.map(jnp.add, total, sums), carry

    xs = jax.tree.map(split, xs)
    sums = jax.eval_shape(one, jax.tree.map(lambda a: a[0], xs))[0]
    zeros = varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums))
    sums, carry = jax.lax.scan(chunk, zeros, xs)
    return sums, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), carry)


def make_train_step(
    cfg, mesh, tx, global_batch_size, ema_rate=None, *, exploration=None, swa_start=None,
    grad_accum_steps=1,
):  # fmt: skip
    """The jitted train step, state -> (state, metric sums), data parallel over the mesh.

    exploration: step -> halt exploration probability (annealing), or None for the config's.
    swa_start: keep the running mean of the weights after every step past this one.
    grad_accum_steps: chunks of each device's rows run one after another (less memory).
    """
    grad_fn = loss_and_grads(cfg, mesh, global_batch_size, grad_accum_steps)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        prob = None if exploration is None else exploration(state["step"])
        min_steps = model.exploration_min_steps(key, cfg, global_batch_size, prob)
        (loss, (carry, metrics)), grads = grad_fn(
            state["params"], state["buffers"], state["carry"], batch, min_steps
        )
        used = carry["data"]["puzzle_identifiers"]
        used_rows = jnp.zeros(cfg.num_puzzle_identifiers, bool).at[used].set(True)
        updates, opt = tx.update(grads, state["opt"], state["params"], rows=used_rows)
        params = optax.apply_updates(state["params"], updates)
        weights = {k: v for k, v in params.items() if k != "puzzle_emb"}
        step = state["step"] + 1
        averages = {}
        if ema_rate is not None:
            averages["ema"] = ema.update(state["ema"], weights, ema_rate)
        if swa_start is not None:
            averages["swa"] = ema.running_mean_update(state["swa"], weights, step > swa_start)
        bad = ~jnp.isfinite(loss) & (state["nan_step"] < 0)
        state = state | averages | {
            "step": step, "params": params, "opt": opt, "carry": carry,
            "nan_step": jnp.where(bad, step, state["nan_step"]),
        }  # fmt: skip
        norms = {"grad_norm": grads, "param_norm": params, "update_norm": updates}
        return state, metrics | {"loss": loss} | {k: optax.tree.norm(v) for k, v in norms.items()}

    return train_step


def make_eval_step(cfg, mesh, ttc=None, outputs=False):
    """The jitted eval step, (params, batch) -> metric sums over the batch's puzzles
    (model.eval_sums), data parallel over the mesh; ttc: the test-time compute. outputs:
    (sums, each puzzle's final answer and q_halt logit), split over the mesh by rows."""
    ttc = ttc or model.TestTimeCompute()
    K, rows, whole = max(ttc.trajectories), P("data"), P()

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(whole, rows, rows),
        out_specs=(whole, rows) if outputs else whole,
    )  # fmt: skip
    def eval_dp(params, carry, batch):
        if not outputs:
            return jax.lax.psum(model.eval_sums(params, cfg, carry, batch, ttc), "data")
        sums, answers = model.eval_sums(params, cfg, carry, batch, ttc, outputs=True)
        return jax.lax.psum(sums, "data"), answers

    @jax.jit
    def eval_step(params, batch):
        trajectories = jax.tree.map(lambda x: jnp.concatenate([x] * K), batch)
        return eval_dp(params, model.initial_carry(cfg, trajectories), batch)

    return eval_step


# ----------------------------------------------------------------------------- evaluation


def test_time_compute(o):
    """The model.TestTimeCompute of --eval_halt_max_steps, --eval_trajectories, --eval_noise*:
    it reports per step count and trajectory count when either flag asks for more than one."""

    def counts(name):
        try:
            values = tuple(sorted({int(v) for v in getattr(o, name)}))
        except ValueError:
            values = (0,)
        if not values or values[0] < 1:
            raise UserError(
                f"--{name}={','.join(getattr(o, name))}: positive integers, e.g. 1,4,16"
            )
        return values

    steps = counts("eval_halt_max_steps") if o.eval_halt_max_steps else ()
    ks = counts("eval_trajectories") if o.eval_trajectories else (1,)
    n_sup = max(steps, default=None)
    if len(steps) == 1 and ks == (1,):
        steps = ()  # one step count and one trajectory: the usual evaluation at that N_sup
    elif not steps and ks != (1,):
        steps = (o.halt_max_steps,)
    return model.TestTimeCompute(n_sup, steps, ks, o.eval_noise, o.eval_noise_state, o.seed)


def eval_batch(o, mesh, ttc, num_eval=None):
    """Puzzles per evaluation batch (each run as K trajectories): --eval_batch_size / K,
    rounded up to whole puzzles per device (data.eval_batch_size), and no more puzzles than the
    evaluation has (`num_eval`; None: unknown)."""
    requested = (o.eval_batch_size or o.global_batch_size) // max(ttc.trajectories)
    return data.eval_batch_size(max(1, min(requested, num_eval or requested)), mesh.size)


def evaluate(
    eval_step, params, batches, to_global, cfg=None, ttc=None, say=None, num_batches=0,
    votes=None,
):  # fmt: skip
    """The eval step's sums over `batches`, as model.eval_metrics (under "eval/"). With
    `say`, a long evaluation prints a progress line every half minute. votes: a
    data.ArcVotes that process 0 gives every puzzle's answer (the eval step's outputs)."""
    total, t0, shown = None, time.time(), time.time()
    for i, local_batch in enumerate(batches):
        batch = to_global(local_batch)
        sums = eval_step(params, batch)
        if votes is not None:
            sums, answers = sums
            rows = (batch["puzzle_identifiers"], batch["inputs"], answers["preds"])
            rows = [*rows, answers["q_halt_logits"]]
            rows = [multihost_utils.process_allgather(x, tiled=True) for x in rows]
            if jax.process_index() == 0:
                votes.add(*rows)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if say and time.time() - shown > 30:
            jax.block_until_ready(total)
            shown, per_batch = time.time(), (time.time() - t0) / (i + 1)
            eta = f", ETA {(num_batches - i - 1) * per_batch / 60:.1f} min" if num_batches else ""
            say(f"eval: batch {i + 1}/{num_batches or '?'}, {per_batch:.1f} s/batch{eta}")
    total = jax.device_get(total)  # replicated sums: every process holds them
    return {f"eval/{k}": v for k, v in model.eval_metrics(total, cfg, ttc).items()}


def eval_lines(log, prefix, step, seconds, ttc):
    """The progress lines of an evaluation: its headline, then one per reported step count
    with exact accuracy for each trajectory count (the Q-head's choice; any right and
    majority vote in brackets)."""
    m = {k.removeprefix(f"{prefix}/"): v for k, v in log.items()}
    yield (
        f"{prefix} @ {step}: exact {m['exact_accuracy']:.4f} | token {m['accuracy']:.4f} | "
        f"q-halt acc {m['q_halt_accuracy']:.3f} | halting by q: exact "
        f"{m['halted_exact_accuracy']:.4f} at {m['halted_steps']:.2f} steps | {m['count']} "
        f"examples in {seconds:.0f} s"
    )
    for S in ttc.steps:
        parts = []
        for k in ttc.trajectories:
            at = f"@steps={S},K={k}"
            part = f"K={k} {m[f'exact_accuracy{at}']:.4f}"
            if k > 1:
                part += (
                    f" (any {m[f'oracle_accuracy{at}']:.4f}, vote {m[f'vote_accuracy{at}']:.4f})"
                )
            parts.append(part)
        yield f"{prefix} after {S} steps: exact " + " | ".join(parts)


# ----------------------------------------------------------------------------- processes, mesh


def init_distributed(o):
    """Join the other processes of a multi-host run, with a timeout instead of a hang."""
    explicit = (o.coordinator_address, o.num_processes, o.process_id)
    if not (o.distributed or any(v is not None for v in explicit)):
        return
    if any(v is not None for v in explicit) and None in explicit:
        raise UserError(
            f"--coordinator_address, --num_processes and --process_id go together; got {explicit}"
        )
    if o.num_processes is not None and not 0 <= o.process_id < o.num_processes:
        raise UserError(f"--process_id={o.process_id} not in [0, {o.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs (tests)
    if o.process_id:  # not the coordinator: is it there at all? (else the runtime aborts)
        wait_for_coordinator(o.coordinator_address, o.distributed_timeout)
    print(
        f"process {o.process_id}: joining {o.num_processes} processes at "
        f"{o.coordinator_address} (up to {o.distributed_timeout} s)",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(
        *explicit, initialization_timeout=o.distributed_timeout,
        heartbeat_timeout_seconds=o.peer_timeout + 60,  # PeerWatch notices a lost peer first
        shutdown_timeout_seconds=o.peer_timeout,  # the exit barrier waits no longer for one
    )  # fmt: skip
    # Every process must run the same experiment: compare the flags (but process_id).
    mine = flags.FLAGS.flags_into_string().replace(f"--process_id={o.process_id}\n", "")
    digest = np.frombuffer(hashlib.sha256(mine.encode()).digest(), np.uint32)
    everyone = multihost_utils.process_allgather(digest)
    if (everyone != digest[None]).any():
        raise UserError("The processes were started with different flags")


def watch_peers(o, ckpt_dir):
    """A multi-process run's ckpt.PeerWatch (None for one process), through process 0's host."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # noqa: PLC0415 (where --distributed found process 0)

    address = o.coordinator_address or distributed.global_state.coordinator_address
    return ckpt.PeerWatch(address.rsplit(":", 1)[0], o.peer_timeout, ckpt_dir)


def wait_for_coordinator(address, timeout):
    host, port = address.rsplit(":", 1)
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as e:
            if time.time() > deadline:
                raise UserError(
                    f"No coordinator at --coordinator_address={address} after "
                    f"--distributed_timeout={timeout} s ({e}); start process 0 there"
                ) from e
            time.sleep(0.5)


def data_mesh(devices=None):
    """One 'data' axis over `devices` (default: every device of every host). bench.py --aot
    passes the chips of a TPU slice described without one (jax.experimental.topologies)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class Run:
    """What the flags make of a training split's metadata and a mesh (`setup`)."""

    o: types.SimpleNamespace  # the flags (options)
    cfg: model.Config  # the trained model (its final curriculum stage)
    eval_cfg: model.Config  # the evaluated one (N_sup: --eval_halt_max_steps)
    ttc: model.TestTimeCompute  # the evaluation's test-time compute
    batch_size: int  # global training batch
    eval_batch_size: int  # puzzles per evaluation batch (eval_batch)
    tx: optax.GradientTransformation
    lr: object  # step -> learning rate
    examples_per_epoch: float
    total_steps: int  # the LR schedule's length
    eval_every: int
    num_steps: int  # steps run (--max_steps may stop early)
    train_step_for: object  # (T, n) -> the jitted train step of that curriculum stage
    eval_step: object  # the jitted eval step

    def stage(self, step):
        """The curriculum's (T, n) at `step`."""
        return curriculum(self.o, self.cfg, step)


def setup(o, meta, mesh, num_eval=None, platform=None, arc=False) -> Run:
    """The model, the optimiser, the run's length and the jitted steps, from the flags `o`,
    the training split's metadata (data.load(...)["meta"]), the number of test examples an
    evaluation runs (None: unknown) and a mesh: what train.py runs and what bench.py --aot
    compiles for a TPU slice (`platform`: the one compiled for). arc: the eval step also
    returns each puzzle's answer, for ARC's votes."""
    B = o.global_batch_size
    if B % mesh.size:  # every training row counts in the loss: no padding rows here
        hosts = len({d.process_index for d in mesh.devices.flat})
        raise UserError(
            f"--global_batch_size={B} does not divide over {mesh.size} devices "
            f"({hosts} processes x {mesh.size // hosts})"
        )
    ttc = test_time_compute(o)
    try:
        cfg = model_config(o, meta, platform)
    except ValueError as e:
        raise UserError(str(e)) from e
    eval_cfg = dataclasses.replace(cfg, N_sup=ttc.n_sup or cfg.N_sup)
    check_schedules(o, cfg)
    examples_per_epoch = meta["total_groups"] * meta["mean_puzzle_examples"]
    # As the reference: the LR schedule spans epochs * examples / B steps; the run is
    # epochs / eval_interval rounds of eval_interval epochs, each ending in an evaluation.
    if o.epochs % o.eval_interval:
        raise UserError(f"--eval_interval={o.eval_interval} must divide --epochs={o.epochs}")
    total_steps = int(o.epochs * examples_per_epoch / B)
    eval_every = int(o.eval_interval * examples_per_epoch / B)
    if eval_every < 1:
        raise UserError(f"--eval_interval={o.eval_interval} epochs is less than one batch")
    num_steps = o.epochs // o.eval_interval * eval_every
    num_steps = min(num_steps, o.max_steps or num_steps)
    tx, lr = optimizer(o, total_steps)
    K = o.grad_accum_steps
    if K < 1 or (B // mesh.size) % K:
        raise UserError(
            f"--grad_accum_steps={K} must be >= 1 and divide the {B // mesh.size} rows of each "
            f"device (--global_batch_size={B} over {mesh.size} devices)"
        )
    step_options = dict(
        ema_rate=o.ema_rate if o.ema else None,
        exploration=exploration_schedule(o, total_steps),
        swa_start=o.swa_start,
        grad_accum_steps=K,
    )

    @functools.cache
    def train_step_for(T, n):  # one compiled step per curriculum stage
        return make_train_step(dataclasses.replace(cfg, T=T, n=n), mesh, tx, B, **step_options)

    return Run(
        o, cfg, eval_cfg, ttc, B, eval_batch(o, mesh, ttc, num_eval), tx, lr, examples_per_epoch,
        total_steps, eval_every, num_steps, train_step_for,
        make_eval_step(eval_cfg, mesh, ttc, outputs=arc),
    )  # fmt: skip


def arc_dataset(o):
    """The ARC dataset evaluations score (one with test_puzzles.json, from data.py arc), or
    None."""
    arc = [p for p in o.data_paths if os.path.exists(os.path.join(p, "test_puzzles.json"))]
    if arc and len(o.data_paths) > 1:
        raise UserError(
            f"--data_paths={','.join(o.data_paths)}: ARC scoring reads one dataset's puzzle "
            f"ids; {arc[0]} is an ARC dataset, give it alone"
        )
    return arc[0] if arc else None


def load_data(o, is_main):
    """(train, test) datasets of --data_paths, or of the built-in data (generated by process 0
    first; the others then reuse it, or on other hosts redo it)."""
    try:  # a user's mistake in the data flags is reported as a usage error, not a traceback
        paths = o.data_paths
        if not paths:
            hard = map(int, o.builtin_blanks if o.builtin_task == "sudoku" else o.builtin_maze)
            sizes = (
                o.builtin_task,
                o.builtin_train,
                o.builtin_test,
                tuple(hard),
                o.builtin_aug,
                o.seed,
            )
            if is_main:
                data.builtin_dataset(o.builtin_dir, *sizes)
            multihost_utils.sync_global_devices("built-in data")
            paths = [data.builtin_dataset(o.builtin_dir, *sizes)]
        train_ds, test_ds = data.load(paths, "train"), data.load(paths, "test")
        if o.train_puzzles is not None or o.train_aug is not None:
            train_ds = data.subset(train_ds, o.train_puzzles, o.train_aug)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    return train_ds, test_ds


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Job:
    """A run's fixed parts, as `main` sets them up: the flags, the compiled `Run`, where the
    rows go, the test set, and where progress goes (`say` prints on process 0 only)."""

    run: Run
    rows: NamedSharding  # the batch's rows over the mesh's devices
    test_ds: dict
    num_eval: int  # test examples an evaluation runs
    say: object  # print(line) on process 0
    write: object  # write(step, metrics) to the run directory
    ckpt_dir: str | None
    watch: ckpt.PeerWatch | None  # several processes: ends this one when another is lost
    arc: str | None = None  # an ARC dataset's folder: evaluations score pass@K (data.ArcVotes)

    @property
    def o(self):  # the flags the Run was set up with
        return self.run.o

    def to_global(self, local_batch):
        return data.to_global(self.rows, local_batch)


def restore(o, cfg, ckpt_dir, state, say):
    """(state, step, data cursor) where the run starts, first match wins:
    1. the newest intact checkpoint in --workdir/ckpt: a restarted or preempted run goes on
       exactly (params, optimiser, EMA, carry, RNG, data cursor, step);
    2. --init_from: weights of a PyTorch TRM checkpoint, or of a checkpoint folder of ours;
    3. the fresh state from --seed."""
    found = ckpt.latest(ckpt_dir) if ckpt_dir and jax.process_index() == 0 else None
    step = int(multihost_utils.broadcast_one_to_all(np.int32(found[0] if found else 0)))
    if ckpt_dir and jax.process_index() == 0:
        ckpt.remove_newer(ckpt_dir, step)  # unfinished saves: a new save starts clean
    multihost_utils.sync_global_devices("checkpoints after the resumed one removed")
    if step:
        state, extra = ckpt.restore(ckpt_dir, step, state)
        return state, step, extra["cursor"]
    if o.init_from:
        try:
            weights, what = ckpt.load_weights(o.init_from, cfg, state, o.init_from_weights == "ema")
            state = ckpt.with_weights(state, weights)
        except (ImportError, ValueError) as e:
            raise UserError(f"--init_from={o.init_from}: {e}") from e
        if o.ema:  # a fresh EMA of them
            weights = {k: v for k, v in state["params"].items() if k != "puzzle_emb"}
            state = state | {"ema": ema.init(weights)}
        say(f"--init_from={o.init_from}: {what}")
    return state, 0, 0


def run_eval(job, state, step, weights=None, prefix="eval"):
    """Evaluate `weights` (default: the EMA if kept, else the raw weights; with the trained
    puzzle table and the buffers) on the test set; log it under `prefix`."""
    o, run, t0 = job.o, job.run, time.time()
    if weights is None:
        weights = state["ema"] if o.ema else state["params"]
    puzzle = {k: v for k, v in state["params"].items() if k == "puzzle_emb"}
    rows = data.process_rows(job.rows, run.eval_batch_size)
    batches = data.eval_batches(job.test_ds, run.eval_batch_size, o.eval_max_examples, rows)
    votes = data.ArcVotes(job.arc) if job.arc else None
    log = evaluate(
        run.eval_step, weights | puzzle | state["buffers"], batches, job.to_global, run.eval_cfg,
        run.ttc, job.say, num_batches=-(-job.num_eval // run.eval_batch_size), votes=votes,
    )  # fmt: skip
    log = {k.replace("eval/", f"{prefix}/", 1): v for k, v in log.items()}
    for line in eval_lines(log, prefix, step, time.time() - t0, run.ttc):
        job.say(line)
    if votes is not None and jax.process_index() == 0:
        log |= arc_result(job, votes, step, prefix)
    job.write(step, log)
    return log


def arc_result(job, votes, step, prefix):
    """ARC pass@K of an evaluation's votes (logged as <prefix>/ARC/pass@K), and its Kaggle
    submission written to --workdir/arc/<prefix>_step_<step>/submission.json."""
    scores, submission = votes.result()
    job.say(f"{prefix} ARC @ {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if job.o.workdir:
        name = f"arc/{prefix}_step_{step:08d}/submission.json"
        ckpt.kvstore(job.o.workdir).write(name, json.dumps(submission).encode()).result()
        job.say(f"wrote {job.o.workdir}/{name}")
    return {f"{prefix}/ARC/{k}": float(v) for k, v in scores.items()}


def run_evals(job, state, step):
    """The EMA (or raw) weights' evaluation, and the running mean's where it is kept."""
    log = run_eval(job, state, step)
    if job.o.swa_start is not None and int(state["swa"]["count"]):
        log |= run_eval(job, state, step, state["swa"]["mean"], "eval_swa")
    return log


def eval_only(job, state, step):
    """--eval_only: evaluate the restored or --init_from weights, or with
    --average_checkpoints=K the mean of the newest K checkpoints' weights."""
    o = job.o
    if not (step or o.init_from):
        raise UserError("--eval_only needs a checkpoint in --workdir or --init_from")
    if not o.average_checkpoints:
        return run_evals(job, state, step)
    key = "ema" if o.ema else "params"
    try:
        trees, steps = ckpt.newest_weights(job.ckpt_dir, o.average_checkpoints, state, key)
    except ValueError as e:
        raise UserError(f"--average_checkpoints={o.average_checkpoints}: {e}") from e
    job.say(f"averaging the {key} weights of steps {steps}")
    return run_eval(job, state, step, ema.mean_of(trees), "eval_avg")


def train(job, state, step, sample, cursor, save, stop):
    """Train from `step` to the run's end, or to a stop request (`stop` fills with a
    signal's name): log every --log_every steps, evaluate every `eval_every`, checkpoint at
    evaluations, every --ckpt_every steps, at the end and on a stop. Returns (step, the
    step of the last checkpoint)."""
    o, run = job.o, job.run
    batch, cursor = sample(cursor)
    batch = job.to_global(batch)
    t_last, since_log, interval, saved = time.time(), 0, None, step
    while step < run.num_steps:
        T, n = run.stage(step)
        state, metrics = run.train_step_for(T, n)(state, batch)
        step, since_log = step + 1, since_log + 1
        if job.watch:
            job.watch.step = step
        next_cursor = cursor  # the checkpoint of this step resumes from here
        batch, cursor = sample(cursor)  # the next batch is sampled while the step runs,
        batch = job.to_global(batch)  # and sent to the devices ahead of the next step
        interval = metrics if interval is None else jax.tree.map(jnp.add, interval, metrics)
        log_step = step % o.log_every == 0 or step == run.num_steps
        if log_step:
            interval = jax.device_get(interval)  # host sync: once per log interval
            check_finite(state, interval)
            now = time.time()
            log_progress(job, step, interval, since_log, since_log / (now - t_last), (T, n))
            t_last, since_log, interval = now, 0, None
        score = None
        if step % run.eval_every == 0 or step == run.num_steps:
            t0 = time.time()
            score = run_evals(job, state, step)["eval/exact_accuracy"]
            t_last += time.time() - t0  # evaluation time is not training time
        stopping = stop_requested(stop, log_step)
        due = step == run.num_steps or score is not None or stopping
        if save and (due or (o.ckpt_every and step % o.ckpt_every == 0)):
            save(step, state, {"cursor": next_cursor, "flags": flags_text()}, score)
            saved = step
        if stopping:
            break
    return step, saved


def log_progress(job, step, sums, num_steps, rate, stage):
    """The progress line and the logged train metrics of the last `num_steps` steps."""
    run = job.run
    log = train_log(sums, run.batch_size, num_steps) | {
        "train/lr": float(run.lr(step)), "train/T": stage[0], "train/n": stage[1],
        "steps_per_s": rate, "examples_per_s": rate * run.batch_size,
    }  # fmt: skip
    job.say(
        f"step {step}/{run.num_steps} | loss {log['train/loss']:.4f} | halted rows: acc "
        f"{log['train/accuracy']:.3f} exact {log['train/exact_accuracy']:.3f} steps "
        f"{log['train/steps']:.2f} | {rate:.2f} steps/s | ETA "
        f"{(run.num_steps - step) / rate / 60:.1f} min"
    )
    job.write(step, log)


def train_log(m, global_batch_size, num_steps):
    """Train metrics summed over `num_steps` steps, as the reference reports them: losses per
    row of the global batch, the others per halted row; the norms and loss per step."""
    count = max(int(m["count"]), 1)
    per_step = ("loss", "grad_norm", "param_norm", "update_norm")
    out = {
        f"train/{k}": float(v) / (global_batch_size * num_steps if k.endswith("loss") else count)
        for k, v in m.items()
        if k not in per_step
    }
    per_step = {f"train/{k}": float(m[k]) / num_steps for k in per_step}
    return out | per_step | {"train/count": int(m["count"])}


def check_finite(state, metrics):
    """A NaN/Inf loss ends the run (exit 1) with the step where it first appeared."""
    nan_step = int(state["nan_step"])
    if nan_step >= 0:
        raise UserError(
            f"The loss became NaN/Inf at step {nan_step} (last logged loss "
            f"{float(metrics['loss'])}); lower --lr or use float32 (docs/TROUBLESHOOTING.md)"
        )


def stop_on_signals():
    """A list that SIGTERM (a preempted TPU VM) or Ctrl-C fills with the signal's name: the
    run checkpoints at the next step boundary and exits 0. A second Ctrl-C stops at once."""
    stop = []

    def on_signal(signum, _):
        if stop:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def stop_requested(stop, log_step):
    """Whether the run stops now: at once with one process; with several, all agree at log
    steps (so every process saves the same step)."""
    if jax.process_count() == 1:
        return bool(stop)
    if not log_step:
        return False
    return bool(multihost_utils.process_allgather(np.int32(bool(stop))).any())


def flags_text():
    return flags.FLAGS.flags_into_string()


DONE = "done.json"  # in --workdir when the run finished: run_all.sh skips the run


def mark_done(o, step):
    if jax.process_index() == 0 and o.workdir:
        record = {"step": step} | ({"eval_only": True} if o.eval_only else {})
        ckpt.kvstore(o.workdir).write(DONE, json.dumps(record).encode()).result()


def main(argv):
    del argv
    o = options()
    if o.retain_host_memory:
        retain_host_memory()
    init_distributed(o)
    say = functools.partial(print, flush=True) if jax.process_index() == 0 else lambda *_: None
    ckpt_dir = f"{o.workdir.rstrip('/')}/ckpt" if o.workdir else None
    watch = watch_peers(o, ckpt_dir)
    try:
        code = start(o, say, ckpt_dir, watch)
    except jax.errors.JaxRuntimeError:
        if watch:  # a collective failed: a lost peer ends this process while it waits
            time.sleep(o.peer_timeout + 5)
        raise
    except SystemExit:  # a user error (a NaN loss, a bad dataset): the others stop too, exit 1
        if watch:
            watch.failed()
        raise
    if watch:
        watch.close()
    return code


def start(o, say, ckpt_dir, watch):
    """Load the data, set the run up, restore its state, then train or only evaluate; the
    exit code."""
    is_main = jax.process_index() == 0
    if o.workdir and is_main:
        try:
            ckpt.check_writable(o.workdir)
        except ValueError as e:
            raise UserError(f"--workdir={o.workdir}: {e}") from e
    mesh = data_mesh()
    rows = NamedSharding(mesh, P("data"))
    train_ds, test_ds = load_data(o, is_main)
    num_eval = min(len(test_ds["inputs"]), o.eval_max_examples or len(test_ds["inputs"]))
    arc = arc_dataset(o)
    run = setup(o, train_ds["meta"], mesh, num_eval, arc=arc is not None)
    K, B = max(run.ttc.trajectories), run.batch_size
    if run.eval_batch_size * K != (o.eval_batch_size or B):
        per = f" x {K} trajectories" if K > 1 else ""
        say(f"evaluation batches of {run.eval_batch_size} puzzles{per} ({mesh.size} devices)")
    sample = data.train_sampler(train_ds, B, o.seed, data.process_rows(rows, B))
    first = data.to_global(rows, sample(0)[0])
    state = init_state(run.cfg, run.tx, first, mesh, o.seed, o.ema, o.swa_start is not None)
    state, step, cursor = restore(o, run.cfg, ckpt_dir, state, say)
    files = {
        "flags.txt": flags_text(),
        "config.json": json.dumps(dataclasses.asdict(run.cfg), indent=1),
        f"env_{step:08d}.json": json.dumps(ckpt.environment(), indent=1),  # a resume may move
    }
    write, close = ckpt.open_workdir(o.workdir if is_main else None, files, resume_step=step)
    job = Job(run, rows, test_ds, num_eval, say, write, ckpt_dir, watch, arc)
    say(
        f"{run.cfg}\n{model.num_params(state['params']):,} params | {run.num_steps} steps "
        f"({o.epochs} epochs of {run.examples_per_epoch} examples) | batch {B} on "
        f"{mesh.size} devices, {jax.process_count()} processes | peak lr "
        f"{float(run.lr(max(1, o.lr_warmup_steps))):.3g}"
        + (f" | resumed from {ckpt_dir}/step_{step:08d}" if step else "")
    )
    code = 0
    if o.eval_only:
        eval_only(job, state, step)
        mark_done(o, step)
    elif o.average_checkpoints:
        raise UserError("--average_checkpoints evaluates finished checkpoints: add --eval_only")
    elif step >= run.num_steps:
        say(f"nothing to do: the run in {o.workdir} finished at step {step}")
        mark_done(o, step)
    else:
        code = finish(job, state, step, sample, cursor)
    close()
    return code


def finish(job, state, step, sample, cursor):
    """Train to the end (or a stop request), wait for the last checkpoint, say how it ended;
    the exit code (EXIT_RESTARTABLE when the last checkpoint could not be saved)."""
    o, t_start, stop = job.o, time.time(), stop_on_signals()
    save, wait = (
        ckpt.checkpointer(job.ckpt_dir, o.keep, o.keep_best) if job.ckpt_dir else (None, None)
    )
    step, saved = train(job, state, step, sample, cursor, save, stop)
    if save and not wait():  # the last checkpoint must be complete before the process ends
        job.say(f"rerun the command to resume (exit {ckpt.EXIT_RESTARTABLE}: restartable)")
        return ckpt.EXIT_RESTARTABLE
    if stop:
        where = (
            f"checkpoint {job.ckpt_dir}/step_{saved:08d}" if save else "no --workdir: no checkpoint"
        )
        job.say(f"{stop[0]}: stopped at step {step}; {where}; rerun the same command to resume")
    else:
        job.say(f"done: {job.run.num_steps} steps in {(time.time() - t_start) / 60:.1f} min")
        mark_done(o, step)
    return 0


if __name__ == "__main__":
    app.run(main)
