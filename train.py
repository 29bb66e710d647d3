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
"""

import atexit
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

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

# data
_DATA_PATHS = flags.DEFINE_list("data_paths", [], "dataset folders (data.py); empty = built-in")
_BUILTIN_TRAIN = flags.DEFINE_integer("builtin_train", 2000, "built-in data: training puzzles")
_BUILTIN_TEST = flags.DEFINE_integer("builtin_test", 1000, "built-in data: held-out test puzzles")
_BUILTIN_BLANKS = flags.DEFINE_list("builtin_blanks", ["40", "50"], "built-in: min,max blanks")
_BUILTIN_AUG = flags.DEFINE_integer("builtin_aug", 100, "built-in: augmentations per puzzle")
_BUILTIN_DIR = flags.DEFINE_string("builtin_dir", "data", "where built-in datasets are cached")
_TRAIN_PUZZLES = flags.DEFINE_integer(
    "train_puzzles", None, "train on the first N puzzles of the training set (data-size ablation)"
)
_TRAIN_AUG = flags.DEFINE_integer(
    "train_aug", None, "augmented variants used per training puzzle (augmentation ablation)"
)
# schedule
_GLOBAL_BATCH_SIZE = flags.DEFINE_integer("global_batch_size", 768, "rows per step, all devices")
_LR_SCALING = flags.DEFINE_enum(
    "lr_scaling", "none", ["none", "linear", "sqrt"], "scale lr, puzzle_emb_lr by batch/base"
)
_BASE_BATCH_SIZE = flags.DEFINE_integer("base_batch_size", 768, "batch the lrs are given for")
_EPOCHS = flags.DEFINE_integer("epochs", 50000, "epochs (one draw per puzzle group each)")
_EVAL_INTERVAL = flags.DEFINE_integer("eval_interval", 5000, "evaluate every this many epochs")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "stop early (the LR schedule is unchanged)")
_EVAL_MAX_EXAMPLES = flags.DEFINE_integer("eval_max_examples", None, "cap on test examples")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", None, "default: global_batch_size")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "steps between progress lines and metrics")
# model (reference arch keys)
_HIDDEN_SIZE = flags.DEFINE_integer("hidden_size", 512, "D")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "attention heads")
_EXPANSION = flags.DEFINE_float("expansion", 4.0, "SwiGLU expansion")
_H_CYCLES = flags.DEFINE_integer("H_cycles", 3, "T: outer cycles per supervision step")
_L_CYCLES = flags.DEFINE_integer("L_cycles", 6, "n: z updates per cycle")
_L_LAYERS = flags.DEFINE_integer("L_layers", 2, "blocks in the network")
_MLP_T = flags.DEFINE_bool("mlp_t", True, "MLP over the sequence instead of attention")
_POS_ENCODINGS = flags.DEFINE_enum("pos_encodings", "none", ["rope", "learned", "none"], "")
_PUZZLE_EMB_NDIM = flags.DEFINE_integer("puzzle_emb_ndim", None, "default: hidden_size")
_PUZZLE_EMB_LEN = flags.DEFINE_integer("puzzle_emb_len", 16, "prefix positions")
_HALT_MAX_STEPS = flags.DEFINE_integer("halt_max_steps", 16, "N_sup: max supervision steps")
_HALT_EXPLORATION_PROB = flags.DEFINE_float("halt_exploration_prob", 0.1, "")
_EVAL_HALT_MAX_STEPS = flags.DEFINE_list(
    "eval_halt_max_steps",
    None,
    "N_sup at evaluation (default: halt_max_steps); a list (16,32,64) runs the largest and "
    "reports eval/exact_accuracy@steps=S,K=k after each",
)
_EVAL_TRAJECTORIES = flags.DEFINE_list(
    "eval_trajectories",
    None,
    "test-time trajectories per puzzle, e.g. 1,4,16: runs the largest K, trajectory 0 without "
    "noise, and reports for the first k of them the answer of the highest q_halt (also: any "
    "right, majority vote); --eval_batch_size counts puzzles x K",
)
_EVAL_NOISE = flags.DEFINE_float(
    "eval_noise",
    0.3,
    "std of the Gaussian noise added to the latent state at each supervision "
    "step of trajectories 1..K-1 (PTRM, arXiv:2605.19943)",
)
_EVAL_NOISE_STATE = flags.DEFINE_enum(
    "eval_noise_state", "z", ["z", "y", "both"], "the state --eval_noise perturbs: z, y or both"
)
_RMS_NORM_EPS = flags.DEFINE_float("rms_norm_eps", 1e-5, "")
_ROPE_THETA = flags.DEFINE_float("rope_theta", 10000.0, "")
_FORWARD_DTYPE = flags.DEFINE_enum("forward_dtype", "bfloat16", list(model.DTYPES), "")
_NO_ACT_CONTINUE = flags.DEFINE_bool("no_ACT_continue", True, "False: add the Q-continue loss")
_LOSS_TYPE = flags.DEFINE_enum("loss_type", "stablemax", ["stablemax", "softmax"], "")
# novel: curriculum recursion, compute-aware halting, checkpoint averaging
_CURRICULUM_STEPS = flags.DEFINE_integer(
    "curriculum_steps",
    0,
    "grow T and n from the start values to H_cycles, L_cycles over this many steps",
)
_CURRICULUM_START_H = flags.DEFINE_integer("curriculum_start_H_cycles", 1, "T at step 0")
_CURRICULUM_START_L = flags.DEFINE_integer("curriculum_start_L_cycles", 2, "n at step 0")
_CURRICULUM_STAGES = flags.DEFINE_integer(
    "curriculum_stages", 3, "distinct (T, n) stages, the last the final one (one compile each)"
)
_HALT_STEP_PENALTY = flags.DEFINE_float(
    "halt_step_penalty", 0.0, "lambda: value one more supervision step costs (needs Q-continue)"
)
_HALT_EXPLORATION_FINAL = flags.DEFINE_float(
    "halt_exploration_final", None, "anneal halt_exploration_prob linearly to this value"
)
_HALT_EXPLORATION_ANNEAL_STEPS = flags.DEFINE_integer(
    "halt_exploration_anneal_steps", None, "over this many steps (default: the whole run)"
)
_SWA_START = flags.DEFINE_integer(
    "swa_start", None, "also evaluate the running mean of the weights from this step on"
)
_AVERAGE_CHECKPOINTS = flags.DEFINE_integer(
    "average_checkpoints", None, "--eval_only: evaluate the mean of the newest K checkpoints"
)
_KERNEL = flags.DEFINE_enum(
    "kernel", "auto", ["auto", "pallas", "xla"], "MLP-mixer block; auto = pallas on TPU, else xla"
)
_INTERPRET = flags.DEFINE_bool("interpret", False, "run the Pallas kernel in its interpreter")
_GRAD_ACCUM_STEPS = flags.DEFINE_integer(
    "grad_accum_steps", 1, "split each device's rows into this many chunks, one backward each"
)
# optimizer
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam_atan2", ["adam_atan2", "adamw", "lion"], "")
_LR = flags.DEFINE_float("lr", 1e-4, "peak learning rate")
_LR_MIN_RATIO = flags.DEFINE_float("lr_min_ratio", 1.0, "cosine floor / peak; 1 = constant")
_LR_WARMUP_STEPS = flags.DEFINE_integer("lr_warmup_steps", 2000, "linear warm-up from 0")
_BETA1 = flags.DEFINE_float("beta1", 0.9, "")
_BETA2 = flags.DEFINE_float("beta2", 0.95, "")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1.0, "decoupled, times lr")
_PUZZLE_EMB_LR = flags.DEFINE_float("puzzle_emb_lr", 1e-4, "SignSGD lr of the puzzle table")
_PUZZLE_EMB_WEIGHT_DECAY = flags.DEFINE_float("puzzle_emb_weight_decay", 1.0, "")
# ema
_EMA = flags.DEFINE_bool("ema", True, "evaluate an EMA of the weights")
_EMA_RATE = flags.DEFINE_float("ema_rate", 0.999, "")
# checkpoints
_CKPT_EVERY = flags.DEFINE_integer(
    "ckpt_every", 1000, "steps between checkpoints in --workdir/ckpt (also after every eval)"
)
_KEEP = flags.DEFINE_integer("keep", 3, "newest checkpoints kept")
_KEEP_BEST = flags.DEFINE_bool("keep_best", False, "also keep the best by eval exact accuracy")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "start from these weights: a PyTorch TRM checkpoint or our ckpt folder"
)
_INIT_FROM_WEIGHTS = flags.DEFINE_enum(
    "init_from_weights",
    "ema",
    ["ema", "raw"],
    "--init_from a run of ours: its EMA weights (what it evaluated; raw where it kept none) "
    "or its raw trained weights",
)
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "evaluate the restored/--init_from weights")
# system
_SEED = flags.DEFINE_integer("seed", 0, "params, data order and exploration")
_WORKDIR = flags.DEFINE_string("workdir", None, "flags.txt, metrics.jsonl, TensorBoard events")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-host: jax.distributed.initialize() finds the hosts (TPU VMs)"
)
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "seconds to wait for every process to join"
)
_RETAIN_HOST_MEMORY = flags.DEFINE_bool(
    "retain_host_memory",
    True,
    "keep freed host memory mapped for reuse (glibc malloc settings, retain_host_memory())",
)


def retain_host_memory() -> bool:
    """Make glibc's malloc keep the memory it frees, so that each step reuses pages that
    are already mapped; call it before JAX starts its threads. Returns False (and changes
    nothing) where the C library has no `mallopt`.

    Why: XLA:CPU allocates a step's scratch (gigabytes for Sudoku-MLP) anew at every
    execution. By default glibc serves that from a fresh mmap and unmaps it after, so every
    step page-faults all of it back in, a large share of a CPU step's time
    (docs/PERFORMANCE.md). Settings: one heap for all threads (per-thread arenas would still
    mmap large blocks), no mmap, never trim the heap, grow it 1 GiB at a time (so that small
    blocks left at its top don't force a fresh region). The heap still grows once or twice
    in the first few steps (that step faults its new pages in), then stays put. Cost: the
    process keeps its peak host memory until it exits (about two steps' scratch)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8  # <malloc.h>
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 2**30))
    return all([mallopt(option, value) == 1 for option, value in settings])  # each one tried


def kernel_choice(platform=None, cfg=None) -> str:
    """--kernel=auto: the fused Pallas kernel (kernels.py) for the MLP-mixer on TPU, where it
    compiles and, given the model's `cfg`, fits the chip's VMEM; the XLA path elsewhere (CPU,
    GPU, attention, float16, a block too wide). `platform`: the one compiled for (default:
    this machine's; bench.py --aot compiles for a TPU on a CPU one)."""
    platform, kernel = platform or jax.devices()[0].platform, _KERNEL.value
    fusable = _FORWARD_DTYPE.value in kernels.KERNEL_DTYPES
    if kernel == "auto":
        fused = platform == "tpu" and _MLP_T.value and fusable
        return "pallas" if fused and (cfg is None or fits_vmem(cfg)) else "xla"
    if kernel == "pallas" and not _MLP_T.value:
        raise ValueError("--kernel=pallas fuses the MLP-mixer block: it needs --mlp_t")
    if kernel == "pallas" and not fusable:
        raise ValueError(
            f"--kernel=pallas takes --forward_dtype={' or '.join(kernels.KERNEL_DTYPES)}, not "
            f"{_FORWARD_DTYPE.value} (Mosaic does not compile it): use --kernel=xla"
        )
    if kernel == "pallas" and platform != "tpu" and not _INTERPRET.value:
        raise ValueError(
            f"--kernel=pallas is a TPU (Mosaic) kernel and this is {platform}: use --kernel=xla,"
            " or add --interpret to run it in the Pallas interpreter (slow; for tests)"
        )
    return kernel


def model_config(meta, platform=None) -> model.Config:
    """The model the flags describe (model.FLAG_KEYS: the flags that set a Config field), for
    a dataset's metadata (vocabulary, length, puzzle identifiers) and the platform compiled
    for (--kernel=auto's choice)."""
    values = {name: flags.FLAGS[name].value for name in model.FLAG_KEYS if name in flags.FLAGS}
    data = {k: meta[k] for k in ("vocab_size", "seq_len", "num_puzzle_identifiers")}
    cfg = model.Config.from_flags(values | data, kernel="xla")  # "auto" is no Config value
    return dataclasses.replace(cfg, kernel=kernel_choice(platform, cfg))


def fits_vmem(cfg) -> bool:
    """Whether the model's fused MLP-mixer block fits the VMEM of the TPU compiled for."""
    widths = (model.swiglu_width(cfg.L, cfg.expansion), model.swiglu_width(cfg.D, cfg.expansion))
    return kernels.fits_vmem(cfg.L, cfg.D, *widths, cfg.dtype)


def curriculum(cfg, step):
    """The (T, n) of the model trained at `step` under curriculum recursion: a staircase of
    --curriculum_stages stages from (--curriculum_start_H_cycles, --curriculum_start_L_cycles)
    to the config's (T, n), stage k of S starting at step k * K / (S - 1) for K =
    --curriculum_steps; the final stage from step K on. A staircase, not a ramp, so that the
    train step compiles once per stage instead of once per step. Without a curriculum, (T, n).
    """
    K, S = _CURRICULUM_STEPS.value, _CURRICULUM_STAGES.value
    if not K:
        return cfg.T, cfg.n
    k = min(S - 1, step * (S - 1) // K)
    T0, n0 = _CURRICULUM_START_H.value, _CURRICULUM_START_L.value
    return (round(T0 + (cfg.T - T0) * k / (S - 1)), round(n0 + (cfg.n - n0) * k / (S - 1)))


def exploration_schedule(total_steps):
    """step -> halt exploration probability: --halt_exploration_prob, annealed linearly to
    --halt_exploration_final over --halt_exploration_anneal_steps (default: the whole run);
    None when not annealed (the config's constant is used)."""
    final = _HALT_EXPLORATION_FINAL.value
    if final is None:
        return None
    start, steps = _HALT_EXPLORATION_PROB.value, _HALT_EXPLORATION_ANNEAL_STEPS.value or total_steps
    return lambda step: start + (final - start) * jnp.minimum(step / max(1, steps), 1.0)


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(base_lr, warmup_steps, total_steps, min_ratio):
    """The reference's: linear warm-up from 0, then cosine to min_ratio * base_lr; `step` is
    1 at the first update."""

    def schedule(step):
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = min_ratio + jnp.maximum(
            0.0, (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        )
        return base_lr * jnp.where(step < warmup_steps, step / max(1, warmup_steps), cosine)

    return schedule


def adam_atan2(lr, b1, b2, weight_decay) -> optax.GradientTransformation:
    """AdamATan2 as the reference's CUDA package computes it, per element at step t:
    p <- p (1 - lr wd) - lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t)), no epsilon."""

    def init(params):
        return {
            "count": jnp.zeros([], jnp.int32),
            "m": jax.tree.map(jnp.zeros_like, params),
            "v": jax.tree.map(jnp.zeros_like, params),
        }

    def update(grads, state, params):
        t = state["count"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        step, sqrt_c2 = lr(t) / (1 - b1**t), jnp.sqrt(1 - b2**t)
        updates = jax.tree.map(
            lambda p, m, v: (
                -lr(t) * weight_decay * p - step * jnp.arctan2(m, jnp.sqrt(v) / sqrt_c2)
            ),
            params,
            m,
            v,
        )
        return updates, {"count": t, "m": m, "v": v}

    return optax.GradientTransformation(init, update)


def sign_sgd_rows(lr, weight_decay) -> optax.GradientTransformationExtraArgs:
    """The puzzle table's optimiser: only the rows used by the batch (`rows`, a bool per
    row) move, by w <- w (1 - lr wd) - lr sign(g), as the reference's sparse SignSGD."""

    def init(params):
        return {"count": jnp.zeros([], jnp.int32)}

    def update(grads, state, params, *, rows, **_):
        t = state["count"] + 1
        updates = jax.tree.map(
            lambda p, g: jnp.where(rows[:, None], -lr(t) * (weight_decay * p + jnp.sign(g)), 0.0),
            params,
            grads,
        )
        return updates, {"count": t}

    return optax.GradientTransformationExtraArgs(init, update)


def optimizer(total_steps):
    """AdamATan2 (or AdamW) on the weights, row-sparse SignSGD on the puzzle table; both lrs
    scaled by --lr_scaling (global batch / --base_batch_size, or its square root)."""
    sched = functools.partial(
        lr_schedule,
        warmup_steps=_LR_WARMUP_STEPS.value,
        total_steps=total_steps,
        min_ratio=_LR_MIN_RATIO.value,
    )
    ratio = _GLOBAL_BATCH_SIZE.value / _BASE_BATCH_SIZE.value
    scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[_LR_SCALING.value]
    lr = sched(_LR.value * scale)
    if _OPTIMIZER.value == "adam_atan2":
        dense = adam_atan2(lr, _BETA1.value, _BETA2.value, _WEIGHT_DECAY.value)
    elif _OPTIMIZER.value == "lion":  # optax counts from 0, the reference's schedule from 1
        dense = optax.lion(
            lambda c: lr(c + 1), _BETA1.value, _BETA2.value, weight_decay=_WEIGHT_DECAY.value
        )
    else:
        dense = optax.adamw(
            lambda c: lr(c + 1),
            _BETA1.value,
            _BETA2.value,
            eps=1e-8,
            weight_decay=_WEIGHT_DECAY.value,
        )
    puzzle = sign_sgd_rows(sched(_PUZZLE_EMB_LR.value * scale), _PUZZLE_EMB_WEIGHT_DECAY.value)
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


def accumulated_loss_and_grads(cfg, mesh, global_batch_size, chunks):
    """((loss, (carry, metrics)), grads) of a train step as `make_steps` computes them, with
    each device's rows in `chunks` chunks run one after another (a scan), each chunk's
    backward done before the next chunk's forward: the activation memory of one chunk, the
    same result as one batch (the loss is a sum over rows; rounding aside).

    The gradients are taken inside the shard_map of weights marked as varying over devices,
    so each device's stay its own (of replicated weights, autodiff would sum them over
    devices at every chunk); they are added up over the chunks, then summed over devices once.
    """
    rows, whole = P("data"), P()

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(whole, whole, rows, rows, rows),
        out_specs=((whole, (rows, whole)), whole),
    )
    def per_device(params, buffers, carry, batch, min_steps):
        varying = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
        buffers = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), buffers)

        def loss_of(params, carry, batch, min_steps):
            return model.loss_fn(
                params | buffers, cfg, carry, batch, min_steps, train=True,
                global_batch_size=global_batch_size,
            )  # fmt: skip

        def one(xs):  # (loss, metric sums, grads) and the new carry of one chunk
            (loss, (carry, metrics, _)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                varying, *xs
            )
            return (loss, metrics, grads), carry

        def chunk(total, xs):
            sums, carry = one(xs)
            return jax.tree.map(jnp.add, total, sums), carry

        def split(a):  # (rows, ...) -> (chunks, rows / chunks, ...)
            return a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])

        xs = jax.tree.map(split, (carry, batch, min_steps))
        sums = jax.eval_shape(one, jax.tree.map(lambda a: a[0], xs))[0]
        zeros = jax.tree.map(
            lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), "data", to="varying"), sums
        )
        (loss, metrics, grads), carry = jax.lax.scan(chunk, zeros, xs)
        carry = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), carry)
        loss, metrics, grads = jax.lax.psum((loss, metrics, grads), "data")
        return (loss, (carry, metrics)), grads

    return per_device


def make_steps(
    cfg,
    mesh,
    tx,
    global_batch_size,
    ema_rate=None,
    *,
    exploration=None,
    swa_start=None,
    ttc=None,
    grad_accum_steps=1,
):
    """The jitted train step and eval step, data parallel over the mesh's 'data' axis.

    exploration: step -> halt exploration probability (annealing), or None for the config's.
    swa_start: keep the running mean of the weights after every step past this one.
    ttc: the evaluation's test-time compute (TestTimeCompute; default: one trajectory).
    grad_accum_steps: chunks of each device's rows run one after another (less memory).
    """
    ttc = ttc or TestTimeCompute()
    rows, whole = P("data"), P()
    accumulated = None
    if grad_accum_steps > 1:
        accumulated = accumulated_loss_and_grads(cfg, mesh, global_batch_size, grad_accum_steps)

    # Each device runs the model on its rows; losses and metric sums are added over devices.
    # Gradients are taken outside the shard_map, of the summed loss (a grad taken inside
    # would already be summed over devices and come out too large).
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(whole, rows, rows, rows),
        out_specs=(whole, (rows, whole)),
    )
    def loss_dp(params, carry, batch, min_steps):
        # Marked as varying over devices up front, so that the weight gradients stay
        # per-device through the model (hand-written VJPs included) and are summed over
        # devices once, here at the boundary, rather than at every use of a weight.
        params = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
        loss, (carry, metrics, _) = model.loss_fn(
            params, cfg, carry, batch, min_steps, train=True, global_batch_size=global_batch_size
        )
        return jax.lax.psum(loss, "data"), (carry, jax.lax.psum(metrics, "data"))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        prob = None if exploration is None else exploration(state["step"])
        min_steps = model.exploration_min_steps(key, cfg, global_batch_size, prob)

        def loss_of(params):
            return loss_dp(params | state["buffers"], state["carry"], batch, min_steps)

        if grad_accum_steps == 1:
            (loss, (carry, metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                state["params"]
            )
        else:
            (loss, (carry, metrics)), grads = accumulated(
                state["params"], state["buffers"], state["carry"], batch, min_steps
            )
        used_rows = (
            jnp.zeros(cfg.num_puzzle_identifiers, bool)
            .at[carry["data"]["puzzle_identifiers"]]
            .set(True)
        )
        updates, opt = tx.update(grads, state["opt"], state["params"], rows=used_rows)
        params = optax.apply_updates(state["params"], updates)
        weights = {k: v for k, v in params.items() if k != "puzzle_emb"}
        step = state["step"] + 1
        bad = ~jnp.isfinite(loss) & (state["nan_step"] < 0)
        state = state | {
            "step": step,
            "params": params,
            "opt": opt,
            "carry": carry,
            "ema": None if ema_rate is None else ema.update(state["ema"], weights, ema_rate),
            "swa": (
                None
                if swa_start is None
                else ema.running_mean_update(state["swa"], weights, step > swa_start)
            ),
            "nan_step": jnp.where(bad, step, state["nan_step"]),
        }
        metrics |= {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        return state, metrics

    K = max(ttc.trajectories)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(whole, rows, rows), out_specs=whole)
    def eval_dp(params, carry, batch):
        """N_sup steps on one batch of b puzzles run as K trajectories each (K * b rows,
        trajectory-major, trajectory 0 unperturbed): final-step metric sums and where the
        Q-head would halt (the first step it says halt, else N_sup) with the exactness
        there, both of trajectory 0; exact hits after each step, of trajectory 0 and of the
        answers the first k trajectories select for each k in ttc.trajectories."""
        b = batch["inputs"].shape[0]
        has_labels = (batch["labels"] != model.IGNORE_LABEL).any(-1)  # not a padding row
        rows_batch = jax.tree.map(lambda x: jnp.concatenate([x] * K), batch)
        first = (jnp.arange(K * b) < b) & jnp.concatenate([has_labels] * K)  # no padding
        perturb = test_time_noise(cfg, ttc, rows_batch, b) if K > 1 and ttc.noise else None

        def one_step(c, _):
            carry, halt_at, exact_at = c
            _, (carry, metrics, out) = model.loss_fn(
                params,
                cfg,
                carry,
                rows_batch,
                train=False,
                global_batch_size=1,
                counted=first,
                perturb=perturb,
            )
            wants = out["q_halt"] > (0 if cfg.no_ACT_continue else out["q_continue"])
            now = (halt_at == 0) & (wants[:b] | (carry["steps"][:b] >= cfg.N_sup))
            halt_at = jnp.where(now, carry["steps"][:b], halt_at)
            exact_at = jnp.where(now, out["seq_correct"][:b], exact_at)
            chosen = select_trajectories(out, rows_batch["labels"][:b], K, ttc.trajectories)
            hits = {k: jnp.sum(v & has_labels, -1) for k, v in chosen.items()}
            return (carry, halt_at, exact_at), (metrics, hits)

        start = (carry, jnp.zeros_like(carry["steps"][:b]), jnp.zeros_like(carry["halted"][:b]))
        (_, halt_at, exact_at), (metrics, hits) = jax.lax.scan(one_step, start, length=cfg.N_sup)
        final = jax.tree.map(lambda m: m[-1], metrics)
        adaptive = {
            "halted_exact_accuracy": jnp.sum(exact_at & has_labels),
            "halted_steps": jnp.sum(jnp.where(has_labels, halt_at, 0)),
        }
        return jax.lax.psum(final | adaptive | hits, "data")

    @jax.jit
    def eval_step(params, batch):
        trajectories = jax.tree.map(lambda x: jnp.concatenate([x] * K), batch)
        return eval_dp(params, model.initial_carry(cfg, trajectories), batch)

    return train_step, eval_step


@dataclasses.dataclass(frozen=True)
class TestTimeCompute:
    """How an evaluation spends extra compute: the supervision steps after which it reports
    exact accuracy, and K trajectories per puzzle (the largest of `trajectories` run;
    selections are reported for the first k of them for each k), trajectory 0 unperturbed
    and the others with Gaussian noise of std `noise` added to `noise_state` before each
    supervision step (PTRM, arXiv:2605.19943). The noise of a trajectory depends on (seed,
    test example, trajectory, step) only, so results do not depend on the batch or the
    number of devices."""

    n_sup: int | None = None  # supervision steps the evaluation runs; None: the trained N_sup
    steps: tuple = ()  # () = report nothing beyond the usual metrics
    trajectories: tuple = (1,)
    noise: float = 0.0
    noise_state: str = "z"
    seed: int = 0


def test_time_compute():
    """The TestTimeCompute of --eval_halt_max_steps, --eval_trajectories, --eval_noise*: it
    reports per step count and trajectory count when either flag asks for more than one."""

    def counts(flag):
        try:
            values = tuple(sorted({int(v) for v in flag.value}))
        except ValueError:
            values = (0,)
        if not values or values[0] < 1:
            raise UserError(f"--{flag.name}={','.join(flag.value)}: positive integers, e.g. 1,4,16")
        return values

    steps = counts(_EVAL_HALT_MAX_STEPS) if _EVAL_HALT_MAX_STEPS.value else ()
    ks = counts(_EVAL_TRAJECTORIES) if _EVAL_TRAJECTORIES.value else (1,)
    if _EVAL_NOISE.value < 0:
        raise UserError(f"--eval_noise={_EVAL_NOISE.value}: a standard deviation, >= 0")
    n_sup = max(steps, default=None)
    if len(steps) == 1 and ks == (1,):
        steps = ()  # one step count and one trajectory: the usual evaluation at that N_sup
    elif not steps and ks != (1,):
        steps = (_HALT_MAX_STEPS.value,)
    noise = (_EVAL_NOISE.value, _EVAL_NOISE_STATE.value, _SEED.value)
    return TestTimeCompute(n_sup, steps, ks, *noise)


def eval_batch_size(requested, num_devices):
    """Puzzles per evaluation batch: the requested number rounded up to a multiple of the
    device count, so that any batch size runs on any number of devices. The extra rows hold
    more test examples; the last batch is padded with rows that count nowhere
    (data.eval_batches)."""
    return -(-requested // num_devices) * num_devices


def test_time_noise(cfg, ttc, rows_batch, b):
    """act_step's `perturb` for K * b trajectory-major rows: trajectory 0 unchanged."""
    index = jnp.maximum(rows_batch["index"], 0)  # the test example of each row (-1: padding)
    trajectory = jnp.arange(index.shape[0]) // b
    scale = jnp.where(trajectory > 0, ttc.noise, 0.0)[:, None, None]
    key = jax.random.key(ttc.seed)

    def noise(index, trajectory, step):  # (2, L, D): for y and for z
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, index), trajectory), step)
        return jax.random.normal(k, (2, cfg.L, cfg.D))

    def perturb(y, z, steps):
        n = jax.vmap(noise)(index, trajectory, steps)
        if ttc.noise_state in ("y", "both"):
            y = (y + scale * n[:, 0]).astype(y.dtype)
        if ttc.noise_state in ("z", "both"):
            z = (z + scale * n[:, 1]).astype(z.dtype)
        return y, z

    return perturb


def select_trajectories(out, labels_BxS, K, ks):
    """Per puzzle (b of them, K trajectories each), whether the answer chosen among its
    first k trajectories is right, for each k in ks: `exact@k` the highest q_halt's (the
    model's own choice), `oracle@k` any of them, `vote@k` the answer most of them give
    (ties to the higher q_halt); `exact@1` is trajectory 0's. Answers compare on the
    labelled cells."""
    b = labels_BxS.shape[0]
    right = out["seq_correct"].reshape(K, b)
    q = out["q_halt"].reshape(K, b)
    answer = jnp.argmax(out["logits"], -1).reshape(K, b, -1)
    mask = labels_BxS != model.IGNORE_LABEL
    same = ((answer[:, None] == answer[None]) | ~mask[None, None]).all(-1)  # (K, K, b)

    def pick(score):  # whether the answer of the best-scored trajectory is right
        return jnp.take_along_axis(right, jnp.argmax(score, 0)[None], 0)[0]

    chosen = {}
    for k in sorted({1, *ks}):
        chosen[f"exact@{k}"] = pick(q[:k])
        if k > 1:
            chosen[f"oracle@{k}"] = right[:k].any(0)
            chosen[f"vote@{k}"] = pick(same[:k, :k].sum(1) + 0.5 * jax.nn.sigmoid(q[:k]))
    return chosen


def evaluate(eval_step, params, batches, to_global, cfg=None, ttc=None, say=None, num_batches=0):
    """Test metrics: means over the test examples of the final step's metric sums, exact
    accuracy after each step, and for each of ttc.steps and trajectory count k (with cfg)
    the accuracies of the selected answers and the forward FLOPs they cost per puzzle.
    With `say`, a long evaluation prints a progress line every half minute."""
    total, t0, shown = None, time.time(), time.time()
    for i, batch in enumerate(batches):
        sums = eval_step(params, to_global(batch))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if say and time.time() - shown > 30:
            jax.block_until_ready(total)
            shown, per_batch = time.time(), (time.time() - t0) / (i + 1)
            eta = f", ETA {(num_batches - i - 1) * per_batch / 60:.1f} min" if num_batches else ""
            say(f"eval: batch {i + 1}/{num_batches or '?'}, {per_batch:.1f} s/batch{eta}")
    total = jax.device_get(total)  # replicated sums: every process holds them
    count = max(int(total.pop("count")), 1)
    per_step = {k: total.pop(k) for k in list(total) if "@" in k}  # (N_sup,) hits each
    out = {f"eval/{k}": float(v) / count for k, v in total.items()}
    out["eval/count"] = count
    for i, hits in enumerate(per_step["exact@1"]):
        out[f"eval/exact_accuracy_step{i + 1}"] = float(hits) / count
    for S in ttc.steps if ttc else ():
        flops = model.flops_per_example(dataclasses.replace(cfg, N_sup=S), train_step=False)
        for name, hits in per_step.items():
            how, k = name.split("@")
            out[f"eval/{how}_accuracy@steps={S},K={k}"] = float(hits[S - 1]) / count
            out[f"eval/flops_per_puzzle@steps={S},K={k}"] = int(k) * flops
    return out


def test_time_lines(log, prefix, ttc):
    """One progress line per reported step count: exact accuracy for each trajectory count
    (the Q-head's choice; any right and majority vote in brackets)."""
    for S in ttc.steps:
        parts = []
        for k in ttc.trajectories:
            at = f"@steps={S},K={k}"
            part = f"K={k} {log[f'{prefix}/exact_accuracy{at}']:.4f}"
            if k > 1:
                part += (
                    f" (any {log[f'{prefix}/oracle_accuracy{at}']:.4f}, vote "
                    f"{log[f'{prefix}/vote_accuracy{at}']:.4f})"
                )
            parts.append(part)
        yield f"{prefix} after {S} steps: exact " + " | ".join(parts)


# ----------------------------------------------------------------------------- main


def UserError(message):  # noqa: N802 (raised like an exception class)
    """A user's mistake: one clear line on stderr and exit code 1, no traceback."""
    return SystemExit(f"train.py: error: {message}")


def init_distributed():
    """Join the other processes of a multi-host run, with a timeout instead of a hang."""
    explicit = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not (_DISTRIBUTED.value or any(v is not None for v in explicit)):
        return
    if any(v is not None for v in explicit) and None in explicit:
        raise UserError(
            f"--coordinator_address, --num_processes and --process_id go together; got {explicit}"
        )
    if _NUM_PROCESSES.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        raise UserError(f"--process_id={_PROCESS_ID.value} not in [0, {_NUM_PROCESSES.value})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs (tests)
    if _PROCESS_ID.value:  # not the coordinator: is it there at all? (else the runtime aborts)
        wait_for_coordinator(_COORDINATOR_ADDRESS.value, _DISTRIBUTED_TIMEOUT.value)
    print(
        f"process {_PROCESS_ID.value}: joining {_NUM_PROCESSES.value} processes at "
        f"{_COORDINATOR_ADDRESS.value} (up to {_DISTRIBUTED_TIMEOUT.value} s)",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(*explicit, initialization_timeout=_DISTRIBUTED_TIMEOUT.value)
    # Every process must run the same experiment: compare the flags (but process_id).
    mine = flags.FLAGS.flags_into_string().replace(f"--process_id={_PROCESS_ID.value}\n", "")
    digest = np.frombuffer(hashlib.sha256(mine.encode()).digest(), np.uint32)
    everyone = multihost_utils.process_allgather(digest)
    if (everyone != digest[None]).any():
        raise UserError("The processes were started with different flags")


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


def process_rows(sharding, batch_size):
    """Rows of a global batch that this process's devices hold (a slice)."""
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted(idx[0].indices(batch_size)[:2] for idx in index_map.values())
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise ValueError(f"This process's devices hold rows {spans}: not one contiguous block")
    return slice(spans[0][0], spans[-1][1])


def data_mesh(devices=None):
    """One 'data' axis over `devices` (default: every device of every host). bench.py --aot
    passes the chips of a TPU slice described without one (jax.experimental.topologies)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def eval_batch(mesh, ttc, num_eval=None):
    """Puzzles per evaluation batch (each run as K trajectories): --eval_batch_size / K,
    rounded up to whole puzzles per device (eval_batch_size), and no more puzzles than the
    evaluation has (`num_eval`; None: unknown)."""
    requested = (_EVAL_BATCH_SIZE.value or _GLOBAL_BATCH_SIZE.value) // max(ttc.trajectories)
    return eval_batch_size(max(1, min(requested, num_eval or requested)), mesh.size)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the flags make of a training split's metadata and a mesh (`setup`)."""

    cfg: model.Config  # the trained model (its final curriculum stage)
    eval_cfg: model.Config  # the evaluated one (N_sup: --eval_halt_max_steps)
    ttc: TestTimeCompute  # the evaluation's test-time compute
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


def setup(meta, mesh, num_eval=None, platform=None) -> Run:
    """The model, the optimiser, the run's length and the jitted steps, from the flags, the
    training split's metadata (data.load(...)["meta"]), the number of test examples an
    evaluation runs (None: unknown) and a mesh: what train.py runs and what bench.py --aot
    compiles for a TPU slice (`platform`: the one compiled for)."""
    B = _GLOBAL_BATCH_SIZE.value
    if B % mesh.size:  # every training row counts in the loss: no padding rows here
        hosts = len({d.process_index for d in mesh.devices.flat})
        raise UserError(
            f"--global_batch_size={B} does not divide over {mesh.size} devices "
            f"({hosts} processes x {mesh.size // hosts})"
        )
    ttc = test_time_compute()
    try:
        cfg = model_config(meta, platform)
    except ValueError as e:
        raise UserError(str(e)) from e
    eval_cfg = dataclasses.replace(cfg, N_sup=ttc.n_sup or cfg.N_sup)
    check_schedules(cfg)
    examples_per_epoch = meta["total_groups"] * meta["mean_puzzle_examples"]
    # As the reference: the LR schedule spans epochs * examples / B steps; the run is
    # epochs / eval_interval rounds of eval_interval epochs, each ending in an evaluation.
    if _EPOCHS.value % _EVAL_INTERVAL.value:
        raise UserError(
            f"--eval_interval={_EVAL_INTERVAL.value} must divide --epochs={_EPOCHS.value}"
        )
    total_steps = int(_EPOCHS.value * examples_per_epoch / B)
    eval_every = int(_EVAL_INTERVAL.value * examples_per_epoch / B)
    if eval_every < 1:
        raise UserError(f"--eval_interval={_EVAL_INTERVAL.value} epochs is less than one batch")
    num_steps = _EPOCHS.value // _EVAL_INTERVAL.value * eval_every
    num_steps = min(num_steps, _MAX_STEPS.value or num_steps)
    tx, lr = optimizer(total_steps)
    K = _GRAD_ACCUM_STEPS.value
    if K < 1 or (B // mesh.size) % K:
        raise UserError(
            f"--grad_accum_steps={K} must be >= 1 and divide the {B // mesh.size} rows of each "
            f"device (--global_batch_size={B} over {mesh.size} devices)"
        )
    step_options = dict(
        ema_rate=_EMA_RATE.value if _EMA.value else None,
        exploration=exploration_schedule(total_steps),
        swa_start=_SWA_START.value,
        grad_accum_steps=K,
    )

    @functools.cache
    def train_step_for(T, n):  # one compiled step per curriculum stage
        return make_steps(dataclasses.replace(cfg, T=T, n=n), mesh, tx, B, **step_options)[0]

    _, eval_step = make_steps(eval_cfg, mesh, tx, B, ttc=ttc)
    return Run(
        cfg, eval_cfg, ttc, B, eval_batch(mesh, ttc, num_eval), tx, lr, examples_per_epoch,
        total_steps, eval_every, num_steps, train_step_for, eval_step,
    )  # fmt: skip


def main(argv):
    del argv
    if _RETAIN_HOST_MEMORY.value:
        retain_host_memory()
    init_distributed()
    is_main = jax.process_index() == 0  # only process 0 prints and writes
    say = functools.partial(print, flush=True) if is_main else lambda *_: None

    mesh = data_mesh()
    row_sharding = NamedSharding(mesh, P("data"))

    def to_global(local_batch):  # this process's rows -> one array over all devices
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(row_sharding, x), local_batch
        )

    # --- data: every process draws the same global batches and loads only its rows
    try:  # a user's mistake in the data flags is reported as a usage error, not a traceback
        paths = _DATA_PATHS.value
        if not paths:  # process 0 generates first; others reuse it (or, on other hosts, redo it)
            if is_main:
                builtin_data()
            multihost_utils.sync_global_devices("built-in data")
            paths = [builtin_data()]
        train_ds, test_ds = data.load(paths, "train"), data.load(paths, "test")
        if _TRAIN_PUZZLES.value is not None or _TRAIN_AUG.value is not None:
            train_ds = data.subset(train_ds, _TRAIN_PUZZLES.value, _TRAIN_AUG.value)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    num_eval = min(len(test_ds["inputs"]), _EVAL_MAX_EXAMPLES.value or len(test_ds["inputs"]))
    run = setup(train_ds["meta"], mesh, num_eval)
    cfg, eval_cfg, ttc, tx, lr = run.cfg, run.eval_cfg, run.ttc, run.tx, run.lr
    B, B_eval = run.batch_size, run.eval_batch_size
    num_steps, eval_every = run.num_steps, run.eval_every
    K = max(ttc.trajectories)
    if B_eval * K != (_EVAL_BATCH_SIZE.value or B):
        per = f" x {K} trajectories" if K > 1 else ""
        say(f"evaluation batches of {B_eval} puzzles{per} ({mesh.size} devices)")
    sample = data.train_sampler(train_ds, B, _SEED.value, process_rows(row_sharding, B))
    eval_rows = process_rows(row_sharding, B_eval)

    # --- init: the same params on every host from the same seed
    batch, cursor = sample(0)
    swa_start = _SWA_START.value
    state = init_state(
        cfg, tx, to_global(batch), mesh, _SEED.value, _EMA.value, swa_start is not None
    )

    # --- restore. Where the run starts, first match wins:
    #   1. the newest complete checkpoint in --workdir/ckpt: a restarted or preempted run goes
    #      on exactly (params, optimiser, EMA, carry, RNG, data cursor, step);
    #   2. --init_from: weights of a PyTorch TRM checkpoint, or of a checkpoint folder of ours;
    #   3. the fresh params from --seed.
    ckpt_dir = f"{_WORKDIR.value.rstrip('/')}/ckpt" if _WORKDIR.value else None
    found = ckpt.latest(ckpt_dir) if ckpt_dir and is_main else None  # process 0 checks
    step = int(multihost_utils.broadcast_one_to_all(np.int32(found[0] if found else 0)))
    if step:
        state, extra = ckpt.restore(ckpt_dir, step, state)
        batch, cursor = sample(extra["cursor"])
    elif _INIT_FROM.value:
        try:
            weights, what = load_weights(_INIT_FROM.value, cfg, state)
        except (ImportError, ValueError) as e:
            raise UserError(f"--init_from={_INIT_FROM.value}: {e}") from e
        state = with_weights(state, weights, _EMA.value)
        say(f"--init_from={_INIT_FROM.value}: {what}")
    write, close = open_workdir(_WORKDIR.value if is_main else None, cfg, resume_step=step)
    save, wait = (
        ckpt.checkpointer(ckpt_dir, _KEEP.value, _KEEP_BEST.value) if ckpt_dir else (None, None)
    )
    say(
        f"{cfg}\n{model.num_params(state['params']):,} params | {num_steps} steps "
        f"({_EPOCHS.value} epochs of {run.examples_per_epoch} examples) | batch {B} on "
        f"{mesh.size} devices, {jax.process_count()} processes | peak lr "
        f"{float(lr(max(1, _LR_WARMUP_STEPS.value))):.3g}"
        + (f" | resumed from {ckpt_dir}/step_{step:08d}" if step else "")
    )

    def eval_params(weights=None):  # EMA (if on) or given weights + puzzle table + buffers
        if weights is None:
            weights = state["ema"] if _EMA.value else state["params"]
        puzzle = {k: v for k, v in state["params"].items() if k == "puzzle_emb"}
        return weights | puzzle | state["buffers"]

    def run_eval(weights=None, prefix="eval"):
        t0 = time.time()
        batches = data.eval_batches(test_ds, B_eval, _EVAL_MAX_EXAMPLES.value, eval_rows)
        log = evaluate(
            run.eval_step, eval_params(weights), batches, to_global, eval_cfg, ttc, say,
            num_batches=-(-num_eval // B_eval),
        )  # fmt: skip
        log = {k.replace("eval/", f"{prefix}/", 1): v for k, v in log.items()}
        say(
            f"{prefix} @ {step}: exact {log[f'{prefix}/exact_accuracy']:.4f} | token "
            f"{log[f'{prefix}/accuracy']:.4f} | q-halt acc {log[f'{prefix}/q_halt_accuracy']:.3f}"
            f" | halting by q: exact {log[f'{prefix}/halted_exact_accuracy']:.4f} at "
            f"{log[f'{prefix}/halted_steps']:.2f} steps | {log[f'{prefix}/count']} examples in "
            f"{time.time() - t0:.0f} s"
        )
        for line in test_time_lines(log, prefix, ttc):
            say(line)
        write(step, log)
        return log

    def run_evals():  # the EMA (or raw) weights, and the running mean of them if kept
        log = run_eval()
        if swa_start is not None and int(state["swa"]["count"]):
            log |= run_eval(state["swa"]["mean"], "eval_swa")
        return log

    if _EVAL_ONLY.value:
        if not (step or _INIT_FROM.value):
            raise UserError("--eval_only needs a checkpoint in --workdir or --init_from")
        if _AVERAGE_CHECKPOINTS.value:
            run_eval(average_checkpoints(ckpt_dir, _AVERAGE_CHECKPOINTS.value, state), "eval_avg")
        else:
            run_evals()
        mark_done(step)
        close()
        return
    if _AVERAGE_CHECKPOINTS.value:
        raise UserError("--average_checkpoints evaluates finished checkpoints: add --eval_only")
    if step >= num_steps:
        say(f"nothing to do: the run in {_WORKDIR.value} finished at step {step}")
        close()
        return

    # SIGTERM (a preempted TPU VM) or Ctrl-C: checkpoint at the next step boundary and exit 0.
    # With several processes they agree on stopping at log steps (a host sync happens there).
    stop = []

    def on_signal(signum, _):
        if stop:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # --- loop
    batch = to_global(batch)
    t_start = t_last = time.time()
    since_log, interval, saved = 0, None, step
    while step < num_steps:
        T, n = curriculum(cfg, step)
        state, metrics = run.train_step_for(T, n)(state, batch)
        step, since_log = step + 1, since_log + 1
        next_cursor = cursor  # the checkpoint of this step resumes from here
        batch, cursor = sample(cursor)  # the next batch is sampled while the step runs,
        batch = to_global(batch)  # and sent to the devices ahead of the next step
        interval = metrics if interval is None else jax.tree.map(jnp.add, interval, metrics)
        log_step = step % _LOG_EVERY.value == 0 or step == num_steps
        if log_step:
            interval = jax.device_get(interval)  # host sync: once per log interval
            check_finite(state, interval)
            now = time.time()
            rate = since_log / (now - t_last)
            log = train_log(interval, B, since_log) | {
                "train/lr": float(lr(step)),
                "train/T": T,
                "train/n": n,
                "steps_per_s": rate,
                "examples_per_s": rate * B,
            }
            say(
                f"step {step}/{num_steps} | loss {log['train/loss']:.4f} | halted rows: acc "
                f"{log['train/accuracy']:.3f} exact {log['train/exact_accuracy']:.3f} steps "
                f"{log['train/steps']:.2f} | {rate:.2f} steps/s | ETA "
                f"{(num_steps - step) / rate / 60:.1f} min"
            )
            write(step, log)
            t_last, since_log, interval = now, 0, None
        score = None
        if step % eval_every == 0 or step == num_steps:
            t0 = time.time()
            score = run_evals()["eval/exact_accuracy"]
            t_last += time.time() - t0  # evaluation time is not training time
        stopping = stop_requested(stop, log_step)
        due = step == num_steps or score is not None or stopping
        if save and (due or (_CKPT_EVERY.value and step % _CKPT_EVERY.value == 0)):
            save(step, state, {"cursor": next_cursor, "flags": _flags_text()}, score)
            saved = step
        if stopping:
            break
    if save:
        wait()  # the last checkpoint must be complete before the process ends
    if stop:
        where = f"checkpoint {ckpt_dir}/step_{saved:08d}" if save else "no --workdir: no checkpoint"
        say(f"{stop[0]}: stopped at step {step}; {where}; rerun the same command to resume")
    else:
        say(f"done: {num_steps} steps in {(time.time() - t_start) / 60:.1f} min")
        mark_done(step)
    close()


DONE = "done.json"


def mark_done(step):
    """done.json in --workdir (process 0): run_all.sh skips a run directory that has it."""
    if jax.process_index() == 0 and _WORKDIR.value:
        record = {"step": step} | ({"eval_only": True} if _EVAL_ONLY.value else {})
        ckpt.kvstore(_WORKDIR.value).write(DONE, json.dumps(record).encode()).result()


def check_schedules(cfg):
    """Clear errors for the curriculum, exploration-annealing and averaging flags."""
    if _CURRICULUM_STEPS.value:
        T0, n0, S = _CURRICULUM_START_H.value, _CURRICULUM_START_L.value, _CURRICULUM_STAGES.value
        if not (1 <= T0 <= cfg.T and 1 <= n0 <= cfg.n):
            raise UserError(
                f"--curriculum_start_H_cycles={T0}, --curriculum_start_L_cycles={n0}: each "
                f"must be in [1, final] (--H_cycles={cfg.T}, --L_cycles={cfg.n})"
            )
        if S < 2:
            raise UserError(f"--curriculum_stages={S}: a curriculum has at least 2 stages")
    final = _HALT_EXPLORATION_FINAL.value
    if final is not None and not 0 <= final <= 1:
        raise UserError(f"--halt_exploration_final={final}: a probability, in [0, 1]")
    if _SWA_START.value is not None and _SWA_START.value < 0:
        raise UserError(f"--swa_start={_SWA_START.value}: a step, >= 0")
    if _AVERAGE_CHECKPOINTS.value is not None and _AVERAGE_CHECKPOINTS.value < 1:
        raise UserError(f"--average_checkpoints={_AVERAGE_CHECKPOINTS.value}: a count, >= 1")


def average_checkpoints(ckpt_dir, k, state):
    """The mean of the weights (EMA if kept, else raw) of the newest k intact checkpoints."""
    found = list(itertools.islice(ckpt.intact(ckpt_dir), k)) if ckpt_dir else []
    if len(found) < k:
        raise UserError(
            f"--average_checkpoints={k}: {len(found)} intact checkpoints in {ckpt_dir} "
            f"(steps {[s for s, _ in found]}); train with --keep >= {k}"
        )
    key = "ema" if _EMA.value else "params"
    target = {key: state[key]}
    trees = []
    for step, _ in found:
        weights = ckpt.restore(ckpt_dir, step, target)[0][key]
        trees.append({name: w for name, w in weights.items() if name != "puzzle_emb"})
    if jax.process_index() == 0:
        print(f"averaging the {key} weights of steps {[s for s, _ in found]}", flush=True)
    return ema.mean_of(trees)


def stop_requested(stop, log_step):
    """Whether the run stops now: at once with one process; with several, all agree at log
    steps (so every process saves the same step)."""
    if jax.process_count() == 1:
        return bool(stop)
    if not log_step:
        return False
    return bool(multihost_utils.process_allgather(np.int32(bool(stop))).any())


def load_weights(path, cfg, state):
    """(weights with the buffers, what they are) from a PyTorch TRM checkpoint file or a
    checkpoint folder of ours. From ours: the EMA where the run kept one (it is what the run
    evaluated), unless --init_from_weights=raw; the puzzle table is always the trained one."""
    if os.path.isfile(path):
        return ckpt.load_torch(path, cfg), "the weights of the PyTorch checkpoint"
    where, found = path, ckpt.latest(path)  # a ckpt folder, or a run directory holding one
    if not found:
        where = f"{path.rstrip('/')}/ckpt"
        found = ckpt.latest(where)
    if not found:
        raise UserError(
            f"--init_from={path}: neither a PyTorch checkpoint file nor a folder "
            "with a complete checkpoint"
        )
    step, commit = found
    target = {"params": state["params"], "buffers": state["buffers"]}
    kept_ema = any(name.startswith("ema/") for name in commit["leaves"])
    if _INIT_FROM_WEIGHTS.value == "ema" and kept_ema:
        target["ema"] = {k: v for k, v in state["params"].items() if k != "puzzle_emb"}
        what = f"the EMA weights of step {step}"
    else:
        what = f"the raw weights of step {step}" + ("" if kept_ema else " (the run kept no EMA)")
    weights, _ = ckpt.restore(where, step, target)
    return weights["params"] | weights.get("ema", {}) | weights["buffers"], what


def with_weights(state, weights, use_ema):
    """The state with these weights (numpy or jax), a fresh EMA of them; optimiser untouched."""

    def place(like, x):
        x = np.asarray(x, like.dtype)
        if x.shape != like.shape:
            raise UserError(
                f"--init_from: a weight of shape {x.shape}, this model needs {like.shape}"
            )
        return jax.make_array_from_callback(like.shape, like.sharding, lambda i: x[i])

    params = {k: state["params"][k] for k in state["params"]}
    params = jax.tree.map(place, params, {k: weights[k] for k in params})
    buffers = jax.tree.map(place, state["buffers"], {k: weights[k] for k in state["buffers"]})
    weights_only = {k: v for k, v in params.items() if k != "puzzle_emb"}
    return state | {
        "params": params,
        "buffers": buffers,
        "ema": ema.init(weights_only) if use_ema else None,
    }


def _flags_text():
    return flags.FLAGS.flags_into_string()


def open_workdir(workdir, cfg, resume_step=0):
    """log(step, metrics) and close() for a run directory, local or gs://: flags.txt,
    config.json (the trained model's Config, which report.py reads), metrics.jsonl and
    TensorBoard events, all written through tensorstore. A resumed run keeps the metrics up
    to its checkpoint's step and appends from there."""
    if not workdir:
        return (lambda step, log: None), (lambda: None)
    store = ckpt.kvstore(workdir)
    store.write("flags.txt", _flags_text().encode()).result()
    store.write("config.json", json.dumps(dataclasses.asdict(cfg), indent=1).encode()).result()
    env = json.dumps(environment(), indent=1).encode()  # one per start: a resume may move
    store.write(f"env_{resume_step:08d}.json", env).result()
    old = ckpt.read_text(store, "metrics.jsonl").splitlines(keepends=True)
    lines = [line for line in old if json.loads(line)["step"] <= resume_step]
    events = tempfile.mkdtemp(prefix="trmx-events-")  # copied into the store at every log
    atexit.register(shutil.rmtree, events, ignore_errors=True)  # also when the run fails
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (only when writing)

    # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint
    writer = SummaryWriter(events, purge_step=resume_step + 1 if resume_step else None)

    def log(step, metrics):
        lines.append(json.dumps({"step": step} | metrics) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(k, v, step)
        writer.flush()
        writes = [store.write("metrics.jsonl", "".join(lines).encode())]
        for name in os.listdir(events):
            with open(os.path.join(events, name), "rb") as f:
                writes.append(store.write(name, f.read()))
        for w in writes:
            w.result()

    def close():
        writer.close()
        shutil.rmtree(events, ignore_errors=True)

    return log, close


def environment():
    """What a run ran on and with, for its record (report.py prints it)."""
    import platform  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    cpuinfo = [line for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = cpuinfo[0].split(":", 1)[1].strip() if cpuinfo else platform.processor()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = ["git", "-C", here, "describe", "--always", "--dirty"]
        commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    versions = {m.__name__: getattr(m, "__version__", "?") for m in (jax, np, optax)}
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "versions": versions | {"jaxlib": getattr(jax.lib, "__version__", "?")},
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "host_cpu": cpu,
        "host_cores": os.cpu_count(),
    }


def _read_lines(path):
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def builtin_data():
    """Path of the built-in dataset the --builtin_* flags describe, generated on first use."""
    lo, hi = map(int, _BUILTIN_BLANKS.value)
    num_train, num_test, aug = _BUILTIN_TRAIN.value, _BUILTIN_TEST.value, _BUILTIN_AUG.value
    name = f"builtin-{num_train}-{num_test}-{lo}-{hi}-{aug}-s{_SEED.value}"
    path = os.path.join(_BUILTIN_DIR.value, name)
    if not os.path.exists(path):
        t0 = time.time()
        tmp = f"{path}.tmp{os.getpid()}"  # built aside, then renamed: never seen half-written
        data.build_builtin(tmp, num_train, num_test, lo, hi, aug, _SEED.value)
        try:
            os.rename(tmp, path)
        except OSError:  # another process on this host finished first
            shutil.rmtree(tmp)
        print(
            f"built-in data: {num_train} x {aug + 1} train / {num_test} test puzzles with "
            f"{lo}..{hi} blanks -> {path} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    return path


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
    return (
        out
        | {f"train/{k}": float(m[k]) / num_steps for k in per_step}
        | {"train/count": int(m["count"])}
    )


def check_finite(state, metrics):
    """A NaN/Inf loss ends the run (exit 1) with the step where it first appeared."""
    nan_step = int(state["nan_step"])
    if nan_step >= 0:
        raise UserError(
            f"The loss became NaN/Inf at step {nan_step} (last logged loss "
            f"{float(metrics['loss'])}); lower --lr or use float32 (docs/TROUBLESHOOTING.md)"
        )


if __name__ == "__main__":
    app.run(main)
