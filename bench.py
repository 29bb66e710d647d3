"""Speed of the train and eval steps against this machine's own matmul peak, in one run.

  # The paper's Sudoku-MLP model at batch 32 in float32 (flags as in train.py):
  python bench.py --flagfile=configs/sudoku_mlp.flags --global_batch_size=32 --forward_dtype=float32
  # A table, one subprocess per row: dtypes x batches x device counts x kernels:
  python bench.py --flagfile=configs/sudoku_mlp.flags --table --dtypes=float32,bfloat16 \
      --batches=32,128 --devices=1,8 --kernels=xla
  # Weak scaling over fake CPU devices (per-device batch fixed):
  python bench.py --flagfile=configs/sudoku_cpu.flags --scaling=1,2,4,8 --per_device_batch=8

Model FLOPs are matmul FLOPs from the config (`model.flops_per_example`, formula there).
For Sudoku-MLP (L=97, D=512, Ft=512, F=1536, T=3, n=6, 2 layers): 42.7 GFLOP per example and
train step. tests/test_tools.py checks the formula against XLA's cost analysis.

MFU = achieved model FLOP/s / peak, where the peak is measured here: the median rate of a
large jnp matmul in the same dtype on one device, accumulated in float32 (for bfloat16 on
XLA:CPU that is the form that reaches its bfloat16 kernels; see kernels.dot). Timings are
medians over --steps steps after warm-up (compilation is timed separately), on a fixed
synthetic batch. The data pipeline is timed alone (`data_batches_per_s`): it must be far
above the step rate.

Before spending TPU time, --aot=SLICE compiles an experiment for a TPU slice on this machine,
with no TPU (libtpu as a compiler only; docs/TPU_COMPILE.md):

  python bench.py --flagfile=configs/sudoku_mlp.flags --aot=v4-32
  ./run_all.sh --aot=v4-32 all          # every point of the roadmap, one Markdown table

libtpu describes the slice's chips (jax.experimental.topologies; JAX's default backend stays
the CPU); `train.setup` builds the model, optimiser and jitted steps that train.py runs, over
a mesh of those chips (`train.data_mesh`); the steps are lowered for the shapes and
shardings of the real state and batch (`train.state_layout`, no arrays) and compiled by the
TPU compiler, Mosaic for the Pallas kernel included: every curriculum stage of the train step
and the eval step, with each kernel (--kernel=auto: both). The memory is XLA's static account
of one chip's program (arguments + outputs - donated + temporaries + code). The roofline time
of a step is max(FLOPs / peak, bytes / HBM bandwidth) of one chip, with the chip's bf16 peak,
the larger of the model's matmul FLOPs and XLA's count, and XLA's bytes accessed. XLA's cost
analysis counts a loop's body once (the T-1 no-gradient cycles, the n z-updates, the eval
step's N_sup ACT steps), so its counts are low. The roofline time has no communication in it:
an estimate, not a measurement.
"""

import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
import data
import model
import train

_STEPS = flags.DEFINE_integer("steps", 5, "timed steps (median reported)")
_WARMUP = flags.DEFINE_integer(
    "warmup", 4, "untimed steps after compilation (host memory settles in the first few)"
)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object as the last line")
_TABLE = flags.DEFINE_bool("table", False, "one row per dtype x batch x devices x kernel")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "--table: forward dtypes")
_BATCHES = flags.DEFINE_list("batches", ["32", "128", "768"], "--table: global batch sizes")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "--table: fake CPU devices (CPU only)")
_KERNELS = flags.DEFINE_list("kernels", ["xla", "pallas"], "--table: mixer implementations")
_SCALING = flags.DEFINE_list("scaling", [], "device counts for the weak-scaling table")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 8, "rows per device (scaling)")
_PEAK_N = flags.DEFINE_integer("peak_n", None, "matmul size for the peak; default by backend")
_TORCH_REF = flags.DEFINE_string(
    "torch_ref", None, "a clone of the official PyTorch TRM: time its train step alternately"
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "--torch_ref: alternating rounds of --steps each")
_AOT = flags.DEFINE_string(
    "aot", None, "compile for this TPU slice here, without a TPU (e.g. v4-32), and report"
)
_AOT_TABLE = flags.DEFINE_string(
    "aot_table", None, "print the Markdown table of the aot.json files under this folder"
)
_AOT_COMMAND = flags.DEFINE_string(
    "aot_command", None, "--aot_table: the command its header names (run_all.sh passes its own)"
)

SUDOKU_META = {"vocab_size": 11, "seq_len": 81, "num_puzzle_identifiers": 1}


def synthetic_batch(cfg, batch_size, seed=0):
    """Random Sudoku-shaped rows: digits as labels, about half the cells blank."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, cfg.vocab_size, (batch_size, cfg.seq_len), dtype=np.int32)
    inputs = np.where(rng.random(labels.shape) < 0.5, 1, labels).astype(np.int32)
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(batch_size, np.int32),
    }


def progress(msg):
    """A progress line on stderr (stdout keeps the results; --json's object stays last)."""
    print(msg, file=sys.stderr, flush=True)


def median_time(fn, steps, warmup, label=None):
    """Median seconds of fn() over `steps` calls after `warmup` calls; fn blocks. With a
    `label`, each call prints a progress line with its time and the ETA of the rest."""
    times, total = [], warmup + steps
    for i in range(total):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if label:
            kind = "warm-up" if i < warmup else "timed"
            eta = (total - i - 1) * float(np.median(times))
            progress(f"{label}: step {i + 1}/{total} ({kind}) {times[-1]:.2f} s, ETA {eta:.0f} s")
    return float(np.median(times[warmup:])) if steps else float("nan")


def matmul_peak(dtype, n=None, steps=5):
    """FLOP/s of an n x n x n jnp matmul in `dtype` on one device, accumulated and returned
    in float32 as the model's matmuls are (`kernels.dot`): the machine's peak as XLA reaches
    it (n: 2048 on CPU, 8192 on accelerators)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_time(lambda: f(a).block_until_ready(), steps, warmup=1)


def peak_memory(compiled):
    """Peak device memory of a compiled step: the allocator's peak where the backend reports
    it (GPU, TPU), else XLA's static estimate (arguments + outputs + temporaries)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def data_rate(batch_size, seconds=2.0):
    """Batches/s of the real sampler alone, on 200 built-in puzzles x 21 augmentations."""
    with tempfile.TemporaryDirectory() as tmp:
        data.build_builtin(tmp, 200, 8, 40, 50, 20)
        sample = data.train_sampler(data.load([tmp], "train"), batch_size, seed=0)
        cursor, count, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, cursor = sample(cursor)
            count += 1
        return count / (time.perf_counter() - t0)


def bench(cfg, B, steps, warmup):
    """Compile and time the train step and the eval step on all local devices."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx, _ = train.optimizer(train.options(), total_steps=10**6)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = jax.device_put(synthetic_batch(cfg, B), rows)
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step = train.make_train_step(cfg, mesh, tx, B, ema_rate=0.999)
    eval_step = train.make_eval_step(cfg, mesh)

    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = peak_memory(compiled)
    progress(f"train step compiled in {compile_s:.1f} s")

    def train_once():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    train_s = median_time(train_once, steps, warmup, "train")
    params = state["params"] | state["buffers"]
    eval_compiled = eval_step.lower(params, batch).compile()
    eval_s = median_time(
        lambda: jax.block_until_ready(eval_compiled(params, batch)), max(1, steps // 2), 0, "eval"
    )
    return {"compile_s": compile_s, "train_step_s": train_s, "eval_step_s": eval_s} | {
        "peak_memory_bytes": memory
    }


def run_one():
    try:
        cfg = train.model_config(train.options(), SUDOKU_META)
    except ValueError as e:  # a bad flag combination (e.g. --kernel=pallas on CPU)
        raise SystemExit(f"bench.py: {e}") from None
    B = train.options().global_batch_size
    peak = matmul_peak(cfg.dtype, _PEAK_N.value)
    r = bench(cfg, B, _STEPS.value, _WARMUP.value)
    flops = model.flops_per_example(cfg)
    result = {
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "global_batch_size": B,
        **r,
        "train_examples_per_s": B / r["train_step_s"],
        "eval_examples_per_s": B / r["eval_step_s"],
        "model_flops_per_example": flops,
        "achieved_flops_per_s": flops * B / r["train_step_s"],
        "peak_flops_per_s": peak,
        # The peak is one device's; with several devices on one machine they share it on CPU.
        "mfu": flops * B / r["train_step_s"] / (peak * max(1, _accelerators())),
        "data_batches_per_s": data_rate(B),
        "config": {k: str(v) for k, v in vars(cfg).items()},
    }
    print(
        f"{cfg}\n"
        f"train step: {r['train_step_s'] * 1e3:.1f} ms = {result['train_examples_per_s']:.2f} "
        f"examples/s (batch {B}, {result['devices']} {result['backend']} devices) | "
        f"{flops / 1e9:.2f} GFLOP/example -> {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"| matmul peak {peak / 1e9:.1f} GFLOP/s | MFU {result['mfu']:.3f}\n"
        f"eval (N_sup={cfg.N_sup} steps): {result['eval_examples_per_s']:.2f} examples/s | "
        f"compile {r['compile_s']:.1f} s | peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB | "
        f"data {result['data_batches_per_s']:.0f} batches/s alone vs "
        f"{1 / r['train_step_s']:.2f} steps/s"
    )
    if _JSON.value:
        print(json.dumps(result))
    return result


def torch_train_step(path, cfg, B):
    """One train step of the official PyTorch TRM on this CPU, from a clone at `path` (its
    code is imported from there, never copied here): its eager model and loss head, forward,
    backward of loss / B, then torch's AdamW (standing in for its CUDA-only AdamATan2; the
    optimiser is well under 1% of the step's FLOPs)."""
    try:
        import torch
    except ImportError:
        raise SystemExit("--torch_ref needs torch: pip install torch") from None
    sys.path.insert(0, os.path.abspath(path))
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    torch.set_num_threads(os.cpu_count())
    arch = {
        "batch_size": B,
        "seq_len": cfg.seq_len,
        "vocab_size": cfg.vocab_size,
        "num_puzzle_identifiers": cfg.num_puzzle_identifiers,
        "puzzle_emb_ndim": cfg.puzzle_emb_ndim,
        "puzzle_emb_len": cfg.puzzle_emb_len,
        "H_cycles": cfg.T,
        "L_cycles": cfg.n,
        "H_layers": 0,
        "L_layers": cfg.layers,
        "hidden_size": cfg.D,
        "expansion": cfg.expansion,
        "num_heads": cfg.heads,
        "pos_encodings": cfg.pos_encodings,
        "halt_max_steps": cfg.N_sup,
        "halt_exploration_prob": cfg.halt_exploration_prob,
        "forward_dtype": cfg.forward_dtype,
        "mlp_t": cfg.mlp_t,
        "no_ACT_continue": cfg.no_ACT_continue,
    }
    net = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(arch), "stablemax_cross_entropy")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = {k: torch.from_numpy(v) for k, v in synthetic_batch(cfg, B).items()}
    carry = net.initial_carry(batch)

    def step():
        nonlocal carry
        carry, loss, *_ = net(carry=carry, batch=batch, return_keys=[])
        (loss / B).backward()
        opt.step()
        opt.zero_grad()

    return step


def _torch_matmul_rate(torch, dtype, n=512):
    """FLOP/s of an n^3 torch matmul in `dtype` (median of 3): for the step time estimate."""
    a = torch.randn(n, n).to(getattr(torch, dtype))
    return 2 * n**3 / median_time(lambda: a @ a, steps=3, warmup=1)


def _torch_worker(conn, path, cfg, B):
    """The official code's train step in a process of its own (spawned). It sends its torch
    version and matmul rate, then the time of its warm-up step; then `conn` receives a step
    count and answers with that many step times; 0 ends it."""
    step = torch_train_step(path, cfg, B)
    torch = sys.modules["torch"]
    conn.send(
        {
            "torch": f"{torch.__version__} with {torch.get_num_threads()} threads",
            "matmul_flops_per_s": _torch_matmul_rate(torch, cfg.forward_dtype),
        }
    )
    t0 = time.perf_counter()
    step()  # warm-up (one step: eager PyTorch has nothing to compile)
    conn.send(time.perf_counter() - t0)
    while n := _recv(conn):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        conn.send(times)


def _recv(conn):
    """The next message, or 0 (stop) once the other end is closed."""
    try:
        return conn.recv()
    except EOFError:
        return 0


def side_by_side(cfg, B):
    """Ours and the official code's train step, alternated (the machine is noisy). Each runs
    in its own process, as each would in use, so that neither's allocations or threads
    disturb the other (in one process our step times were less steady). Ours warms up
    --warmup steps first: XLA:CPU's scratch heap still grows once or twice in the first few
    steps (train.retain_host_memory), and a round that catches that step reads slow."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs XLA
    conn, child_conn = ctx.Pipe()
    worker = ctx.Process(target=_torch_worker, args=(child_conn, _TORCH_REF.value, cfg, B))
    worker.start()
    child_conn.close()  # so that recv() here sees EOF if the worker dies
    try:
        info = conn.recv()
        torch_version, rate = info["torch"], info["matmul_flops_per_s"]
        guess = model.flops_per_example(cfg) * B / rate
        progress(
            f"official code: torch {torch_version}; its {cfg.forward_dtype} matmul runs "
            f"{rate / 1e9:.1f} GFLOP/s here (512^3): its step's matmuls at that rate take "
            f"{guess:.0f} s (a rough guide); warming up (1 step)"
        )
        progress(f"official code: warm-up step {conn.recv():.1f} s")
        ours = ours_train_step(cfg, B)
        # compilation, then host memory settling
        median_time(ours, 0, 1 + _WARMUP.value, "trmx warm-up")
        times = {"trmx": [], "torch": []}
        for r in range(_ROUNDS.value):
            times["trmx"].append(median_time(ours, _STEPS.value, 0))
            conn.send(_STEPS.value)
            times["torch"].append(float(np.median(conn.recv())))
            eta = (_ROUNDS.value - r - 1) * (times["trmx"][-1] + times["torch"][-1]) * _STEPS.value
            progress(
                f"round {r + 1}/{_ROUNDS.value}: trmx {times['trmx'][-1]:.2f} s/step, "
                f"official code {times['torch'][-1]:.2f} s/step; ETA {eta:.0f} s"
            )
        conn.send(0)
    except EOFError:  # the worker died: its traceback is above
        raise SystemExit("--torch_ref: the official code's process failed (above)") from None
    finally:
        conn.close()  # on any error here too: the worker's recv() then ends it
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
    result = {f"{k}_examples_per_s": B / float(np.median(v)) for k, v in times.items()}
    result["speedup"] = result["trmx_examples_per_s"] / result["torch_examples_per_s"]
    print(
        f"{cfg.forward_dtype}, batch {B}: trmx {result['trmx_examples_per_s']:.2f} examples/s, "
        f"official PyTorch code {result['torch_examples_per_s']:.2f} examples/s -> "
        f"{result['speedup']:.2f}x (medians of {_ROUNDS.value} alternating rounds x "
        f"{_STEPS.value} steps, each in its own process; torch {torch_version})"
    )
    return result


def ours_train_step(cfg, B):
    """Our jitted train step as a blocking closure (one device)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx, _ = train.optimizer(train.options(), total_steps=10**6)
    batch = jax.device_put(synthetic_batch(cfg, B), jax.devices()[0])
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step = train.make_train_step(cfg, mesh, tx, B, ema_rate=0.999)

    def step():
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)

    return step


def _accelerators():
    """Devices that each have their own peak (CPU fake devices share one machine)."""
    return 1 if jax.default_backend() == "cpu" else jax.local_device_count()


def subprocess_row(devices, overrides):
    """One configuration in a fresh process (the device count is fixed when JAX starts)."""
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    skip = ("--table", "--scaling", "--json", "--dtypes", "--batches", "--devices", "--kernels")
    args = [a for a in sys.argv[1:] if not a.startswith(skip)]
    cmd = [sys.executable, __file__, *args, *overrides, "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table():
    print("kernel | dtype | batch | devices | examples/s | GFLOP/s | peak GFLOP/s | MFU | eval/s")
    rows = []
    for kernel in _KERNELS.value:
        for dtype in _DTYPES.value:
            for B in _BATCHES.value:
                for n in _DEVICES.value:
                    flags_ = [f"--kernel={kernel}", f"--forward_dtype={dtype}"]
                    r = subprocess_row(int(n), [*flags_, f"--global_batch_size={B}"])
                    rows.append(r | {"kernel": kernel})
                    head = f"{kernel:6s} | {dtype:8s} | {B:>5s} | {n:>7s}"
                    if "error" in r:
                        print(f"{head} | not run: {r['error']}")
                        continue
                    print(
                        f"{head} | {r['train_examples_per_s']:10.2f} | "
                        f"{r['achieved_flops_per_s'] / 1e9:7.1f} | "
                        f"{r['peak_flops_per_s'] / 1e9:12.1f} | {r['mfu']:.3f} | "
                        f"{r['eval_examples_per_s']:.2f}",
                        flush=True,
                    )
    return rows


def weak_scaling(counts, per_device_batch):
    rows = [subprocess_row(n, [f"--global_batch_size={n * per_device_batch}"]) for n in counts]
    for n, r in zip(counts, rows, strict=True):
        if "error" in r:
            raise SystemExit(f"{n} devices: {r['error']}")
    base = rows[0]["train_examples_per_s"]
    print(
        f"weak scaling, {per_device_batch} rows per device, {os.cpu_count()} CPU cores shared by "
        "all fake devices"
    )
    print("devices | global batch | step ms | examples/s | examples/s vs 1 device")
    for r in rows:
        print(
            f"{r['devices']:7d} | {r['global_batch_size']:12d} | {r['train_step_s'] * 1e3:7.1f} | "
            f"{r['train_examples_per_s']:10.1f} | {r['train_examples_per_s'] / base:.3f}"
        )
    return rows


# --aot: compile for a TPU slice without a TPU.


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_flops: float  # bf16, per chip
    hbm_bytes_per_s: float
    source: str


# Google's published figures per chip (the pages' units: GiB for v4, GB for the others).
CHIPS = {
    "v4": Chip("TPU v4", 32 * 2**30, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95e9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# Slice name -> (libtpu topology, chip config, chips per host). The name counts TensorCores
# for v4 and v5p (two per chip, one JAX device per chip: "megacore"), chips for v5e and v6e.
SLICES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
    "v4-64": ("v4:2x4x4", "megacore", (2, 2, 1)),
    "v4-128": ("v4:4x4x4", "megacore", (2, 2, 1)),
    "v4-256": ("v4:4x4x8", "megacore", (2, 2, 1)),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1)),
    "v5e-4": ("v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": ("v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": ("v5e:4x4", "default", (2, 2, 1)),
    "v5e-32": ("v5e:4x8", "default", (2, 2, 1)),
    "v5e-64": ("v5e:8x8", "default", (2, 2, 1)),
    "v6e-4": ("v6e:2x2", "default", (2, 2, 1)),
    "v6e-8": ("v6e:2x4", "default", (2, 4, 1)),
    "v6e-16": ("v6e:4x4", "default", (2, 2, 1)),
    "v6e-32": ("v6e:4x8", "default", (2, 2, 1)),
    "v6e-64": ("v6e:8x8", "default", (2, 2, 1)),
}

# The metadata of datasets that may not be on this machine, by the name data.py's commands
# give their folders (README, Data). Sudoku-Extreme: the training count is the number before
# "k" in the folder name (--subsample); 423K test puzzles (the paper's count).
SUDOKU = dict(SUDOKU_META, mean_puzzle_examples=1)
KNOWN_DATA = {r"sudoku-extreme-(\d+)k\b": SUDOKU}
SUDOKU_EXTREME_TEST = 423_000


def aot_error(message):
    return SystemExit(f"bench.py: --aot: {message}")


def use_compile_only_tpu(slice_name):
    """Make libtpu usable as a compiler only, quietly, before anything starts it. At start it
    looks for a TPU VM's settings and warns on stderr when they are missing; these stand in for
    them. Another process here may hold libtpu's lock file: a compiler needs no TPU to itself.
    JAX's default backend stays the CPU (a TPU attached here is left alone)."""
    if importlib.util.find_spec("libtpu") is None:
        raise aot_error(
            f'needs the TPU compiler (libtpu): pip install "jax[tpu]=={jax.__version__}"'
        )
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")


def describe(slice_name):
    """(Chip, the slice's JAX devices) from libtpu, with no TPU attached."""
    from jax.experimental import topologies  # noqa: PLC0415

    if slice_name not in SLICES:
        raise aot_error(f"unknown slice {slice_name!r}; known: {', '.join(SLICES)}")
    name, chip_config, per_host = SLICES[slice_name]
    try:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=chip_config,
            chips_per_host_bounds=per_host,
            num_slices=1,
        )
    except Exception as e:  # noqa: BLE001 (libtpu's errors have no common type)
        raise aot_error(f"libtpu cannot describe {slice_name} ({name}): {e}") from None
    return CHIPS[slice_name.split("-")[0]], topo.devices


def train_meta():
    """(training split's metadata, test examples or None, where they came from): read from
    the dataset when it is here, else the known metadata of its kind (KNOWN_DATA), else the
    built-in data's from its flags; --train_puzzles and --train_aug applied."""
    o = train.options()
    paths, puzzles, aug = o.data_paths, o.train_puzzles, o.train_aug
    if not paths:
        meta = dict(SUDOKU, total_groups=o.builtin_train)
        test, source = o.builtin_test, "built-in data (its flags)"
    elif all(os.path.exists(os.path.join(p, "train", "dataset.json")) for p in paths):
        ds = data.load(paths, "train")
        if puzzles is not None or aug is not None:
            ds = data.subset(ds, puzzles, aug)
        test = len(data.load(paths, "test")["inputs"]) if _has_test(paths) else None
        return ds["meta"], test, f"{','.join(paths)} (dataset.json)"
    else:
        found = [(p, m, re.search(pat, p)) for p in paths for pat, m in KNOWN_DATA.items()]
        found = [(p, m, match) for p, m, match in found if match]
        if len(paths) != 1 or not found:
            raise aot_error(
                f"--data_paths={','.join(paths)}: not on this machine and of no known kind "
                f"({', '.join(KNOWN_DATA)}); build it (python data.py) or pass one that is here"
            )
        path, known, match = found[0]
        meta = dict(known, total_groups=int(match.group(1)) * 1000)
        test = SUDOKU_EXTREME_TEST
        source = f"{path} is not here: Sudoku-Extreme's metadata, {meta['total_groups']} "
        source += "training puzzles (the folder name), ~423K test puzzles (the paper's)"
    if puzzles is not None:
        meta["total_groups"] = puzzles  # mean_puzzle_examples stays 1: one example a puzzle
    return meta, test, source


def _has_test(paths):
    return all(os.path.exists(os.path.join(p, "test", "dataset.json")) for p in paths)


def batch_shapes(mesh, rows, seq_len, eval_batch=False):
    """The shapes and row sharding of a global batch (what train.py's to_global makes); an
    evaluation batch also numbers its test examples (data.eval_batches' "index")."""
    sharding = NamedSharding(mesh, P("data"))

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

    batch = {"inputs": s(rows, seq_len), "labels": s(rows, seq_len), "puzzle_identifiers": s(rows)}
    return batch | ({"index": s(rows)} if eval_batch else {})


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute|collective-broadcast|ragged-all-to-all)(-start)?\(",
    re.M,
)
_HOST = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? (send|recv|infeed|outfeed)(-start)?\(", re.M)
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+|f8\w*|c64|c128)\[([\d,]*)\]")


def _bytes(shapes):
    """Bytes of the arrays in an HLO shape string, e.g. '(f32[512,97]{0,1}, s32[])'."""
    total = []
    for dtype, dims in _ARRAY.findall(shapes):
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype) or 16)
        bits = 16 if dtype == "bf16" else bits
        total.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return total


def collectives(hlo_text):
    """{op: (count, bytes)} of the collectives in an optimised HLO module, bytes being their
    results' (an async all-gather or permute's -start holds its operands too: half counted),
    and the number of host transfers (send, recv, infeed, outfeed)."""
    out = {}
    for shapes, op, start in _COLLECTIVE.findall(hlo_text):
        sizes = _bytes(shapes)
        if start and op in ("all-gather", "collective-permute"):
            sizes = [s for s in sizes if s > 4]  # the context scalars
            sizes = sizes[len(sizes) // 2 :]
        count, total = out.get(op, (0, 0))
        out[op] = (count + 1, total + sum(sizes))
    return out, len(_HOST.findall(hlo_text))


def analyse(compiled, chip, model_flops):
    """What the compiler says of one chip's program, and its roofline time."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
    }
    total = sum(v for k, v in memory.items() if k != "alias_bytes") - m.alias_size_in_bytes
    ops, host = collectives(compiled.as_text())
    flops = max(model_flops, float(cost.get("flops", 0)))
    bytes_accessed = float(cost.get("bytes accessed", 0))
    return memory | {
        "total_bytes": total,
        "hbm_bytes": chip.hbm_bytes,
        "fits": total <= chip.hbm_bytes,
        "model_flops": model_flops,
        "xla_flops": float(cost.get("flops", 0)),
        "xla_bytes_accessed": bytes_accessed,
        "collectives": {op: {"count": c, "bytes": b} for op, (c, b) in sorted(ops.items())},
        "host_transfers": host,
        "roofline_s": max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_s),
    }


AOT_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trmx-aot"
)


def compile_one(step, args, chip, model_flops, slice_name):
    """Lower and compile `step` for `args` (shapes); the analysis, or the error in one line.
    A program too big for the chip's HBM is the compiler's RESOURCE_EXHAUSTED error, with its
    numbers (it counts against the HBM it can use: 30.75 GiB of v4's 32).

    Results are kept in AOT_CACHE by a hash of the slice, the versions and the lowered program's
    text: a program compiled before (another sweep point that differs only in its data, or
    the same eval step) is read back, marked "cached", with its first compile time."""
    t0, path = time.perf_counter(), None
    try:
        lowered = step.lower(*args)
        versions = f"{slice_name} jax {jax.__version__} libtpu {_libtpu_version()}\n"
        key = hashlib.sha256((versions + lowered.as_text()).encode()).hexdigest()
        path = os.path.join(AOT_CACHE, f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f) | {"cached": True}
        result = analyse(lowered.compile(), chip, model_flops)
    except Exception as e:  # noqa: BLE001 (the compiler's errors: reported, not raised)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if msg.startswith("RESOURCE_EXHAUSTED"):
            msg = "does not fit in HBM: " + msg.split(":", 1)[1].strip()
        result = {"error": msg[:400], "fits": False}
    result["compile_s"] = time.perf_counter() - t0
    if path:  # written aside, then renamed: never read half-written
        os.makedirs(AOT_CACHE, exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(result, f)
        os.replace(f"{path}.{os.getpid()}", path)
    return result


def _libtpu_version():
    return importlib.metadata.version("libtpu")


def stage_steps(run):
    """{(T, n): steps trained at it}: the curriculum's stages (train.curriculum)."""
    return Counter(run.stage(s) for s in range(run.num_steps))


def compile_experiment(slice_name, kernels):
    """Every program of the experiment the flags describe, compiled for `slice_name` with each
    kernel: a dict for --json and the report. An --eval_only run compiles its eval step only."""
    chip, devices = describe(slice_name)
    mesh = train.data_mesh(devices)
    hosts = len({d.process_index for d in devices})
    meta, test_examples, source = train_meta()
    examples = test_examples
    o = train.options()
    if examples is not None and o.eval_max_examples:
        examples = min(examples, o.eval_max_examples)
    jobs = []
    for kernel in kernels:
        run = train.setup(train.options(kernel=kernel), meta, mesh, examples, platform="tpu")
        B, B_eval, K = run.batch_size, run.eval_batch_size, max(run.ttc.trajectories)
        shapes = batch_shapes(mesh, B, run.cfg.seq_len)
        _, state, shardings = train.state_layout(
            run.cfg, run.tx, shapes, mesh, 0, o.ema, o.swa_start is not None
        )
        state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings
        )
        stages = {} if o.eval_only else stage_steps(run)
        for (T, n), steps in sorted(stages.items()):
            cfg = dataclasses.replace(run.cfg, T=T, n=n)
            flops = model.flops_per_example(cfg) * B / mesh.size
            args = (state, shapes)
            jobs.append(
                (kernel, f"train T={T} n={n}", steps, run.train_step_for(T, n), args, flops)
            )
        params = state["params"] | state["buffers"]
        flops = model.flops_per_example(run.eval_cfg, train_step=False) * B_eval * K / mesh.size
        eval_args = (params, batch_shapes(mesh, B_eval, run.cfg.seq_len, eval_batch=True))
        evals = -(-run.num_steps // run.eval_every)  # after every eval_every steps and at the end
        evals = 1 if o.eval_only else evals
        batches = None if examples is None else evals * -(-examples // B_eval)
        jobs.append((kernel, "eval", batches, run.eval_step, eval_args, flops))

    rows, t_start = [], time.perf_counter()
    for i, (kernel, program, count, step, args, flops) in enumerate(jobs):
        done = time.perf_counter() - t_start
        eta = f", ETA {done / i * (len(jobs) - i):.0f} s" if i else ""
        progress(
            f"aot {slice_name}: compiling {program} ({kernel}) {i + 1}/{len(jobs)}, "
            f"{done:.0f} s so far{eta}"
        )
        r = compile_one(step, args, chip, flops, slice_name)
        rows.append({"kernel": kernel, "program": program, "count": count} | r)
    return {
        "slice": slice_name,
        "chip": dataclasses.asdict(chip),
        "chips": mesh.size,
        "hosts": hosts,
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
        "machine": machine(),
        "data": source,
        "global_batch_size": B,
        "eval_batch_size": B_eval,
        "eval_trajectories": K,
        "num_steps": run.num_steps,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
        "param_bytes": sum(
            math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state["params"])
        ),
        "config": {k: str(v) for k, v in vars(run.cfg).items()},
        "rows": rows,
        "estimate": estimates(rows),
    }


def estimates(rows):
    """Per kernel: the run's roofline time (train steps of each stage, and the evaluations
    when the test set's size is known), in hours: an estimate, not a measurement."""
    out = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        if any("error" in r for r in mine):
            out[kernel] = None
            continue
        train_s = sum(r["count"] * r["roofline_s"] for r in mine if r["program"] != "eval")
        ev = next(r for r in mine if r["program"] == "eval")
        eval_s = None if ev["count"] is None else ev["count"] * ev["roofline_s"]
        out[kernel] = {
            "train_h": train_s / 3600,
            "eval_h": None if eval_s is None else eval_s / 3600,
        }
    return out


def _size(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _gflop(f):
    return f"{f / 1e9:,.0f}" if f >= 1e11 else f"{f / 1e9:.3g}"


def _hours(h):
    return f"{h:.2f} h" if h >= 0.1 else f"{h * 60:.2g} min" if h >= 1 / 60 else f"{h * 3600:.2g} s"


def _seconds(t):
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def aot_report(r):
    """The human-readable report of compile_experiment's result."""
    c = r["chip"]
    lines = [
        f"{r['slice']}: {r['chips']} {c['name']} chips over {r['hosts']} hosts | per chip "
        f"{c['hbm_bytes'] / 2**30:.1f} GiB HBM, {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{c['hbm_bytes_per_s'] / 1e9:.0f} GB/s ({c['source']}) | jax {r['versions']['jax']}, "
        f"libtpu {r['versions']['libtpu']}, compiled on this machine without a TPU",
        f"{r['params']:,} params | batch {r['global_batch_size']} "
        f"({r['global_batch_size'] // r['chips']} rows per chip), eval batch "
        f"{r['eval_batch_size']}"
        + (f" x {r['eval_trajectories']} trajectories" if r.get("eval_trajectories", 1) > 1 else "")
        + f" | {r['num_steps']} steps | data: {r['data']}",
        "per chip: args + out - donated + temp + code = total of HBM | model / XLA GFLOP, XLA "
        "GB accessed | collectives (op x count, result bytes) | compile time | roofline step",
    ]
    for x in r["rows"]:
        head = f"  {x['kernel']:6s} {x['program']:14s}"
        if "error" in x:
            cached = " (cached)" if x.get("cached") else ""
            lines.append(f"{head} NOT COMPILED ({x['compile_s']:.0f} s{cached}): {x['error']}")
            continue
        coll = ", ".join(
            f"{op} x{v['count']} {_size(v['bytes'])}" for op, v in x["collectives"].items()
        )
        fits = "fits" if x["fits"] else "DOES NOT FIT"
        lines.append(
            f"{head} {_size(x['argument_bytes'])} + {_size(x['output_bytes'])} - "
            f"{_size(x['alias_bytes'])} + {_size(x['temp_bytes'])} + {_size(x['code_bytes'])} "
            f"= {_size(x['total_bytes'])} of {_size(x['hbm_bytes'])}: {fits} | "
            f"{_gflop(x['model_flops'])} / {_gflop(x['xla_flops'])} GFLOP, "
            f"{x['xla_bytes_accessed'] / 1e9:.3g} GB | {coll or 'none'}"
            + (f", {x['host_transfers']} host transfers" if x["host_transfers"] else "")
            + f" | {x['compile_s']:.0f} s{' (cached)' if x.get('cached') else ''} | "
            + _seconds(x["roofline_s"])
        )
    for kernel, e in r["estimate"].items():
        if e is None:
            lines.append(f"  {kernel}: no estimate (a program did not compile)")
            continue
        ev = "evaluations not counted (test set size unknown)"
        if e["eval_h"] is not None:
            ev = f"+ evaluations {_hours(e['eval_h'])} = {_hours(e['train_h'] + e['eval_h'])}"
        lines.append(
            f"  {kernel}: ESTIMATE (roofline, no communication, not measured): training "
            f"{_hours(e['train_h'])} {ev}"
        )
    return "\n".join(lines)


def aot_main(slice_name, as_json):
    use_compile_only_tpu(slice_name)
    o = train.options()
    kernel = o.kernel
    if kernel == "auto":
        kernels = ["pallas", "xla"] if o.mlp_t else ["xla"]
    else:
        kernels = [kernel]
    result = compile_experiment(slice_name, kernels)
    print(aot_report(result), flush=True)
    if as_json:
        print(json.dumps(result))
    return result


def machine():
    """This machine's CPU and core count (where the compiling ran)."""
    names = [line for line in ckpt.read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores"


def _natural(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def aot_table(root, command):
    """Markdown: one row per point and kernel of every aot.json under `root` (written by
    run_all.sh --aot), E1.1 first."""
    paths = glob.glob(os.path.join(root, "**", "aot.json"), recursive=True)
    points = sorted(
        (os.path.relpath(os.path.dirname(p), root) for p in paths),
        key=lambda p: (not p.startswith("sudoku_mlp"), _natural(p)),
    )
    out, head = [], None
    for point in points:
        with open(os.path.join(root, point, "aot.json")) as f:
            r = json.load(f)
        experiment, _, sweep = point.partition("/")
        flags_ = re.findall(r"([A-Za-z_]+?)-([^_]+)(?:_|$)", sweep)  # run_all.sh's point_dir
        name = f"| {experiment} | {' '.join(f'--{k}={v}' for k, v in flags_) or '-'} |"
        if "error" in r:
            out.append(f"{name} - | not compiled: {r['error']} | | | | | |")
            continue
        head = head or r
        for kernel, estimate in r["estimate"].items():
            mine = [x for x in r["rows"] if x["kernel"] == kernel]
            errors = [f"{x['program']}: {x['error']}" for x in mine if "error" in x]
            if errors:
                fits = "**NO**" if any("does not fit" in e for e in errors) else "error"
                out.append(f"{name} {kernel} | - | {fits}: {'; '.join(errors)} | | | | | |")
                continue
            trains = [x for x in mine if x["program"] != "eval"]
            ev = next(x for x in mine if x["program"] == "eval")
            hbm = max(x["total_bytes"] for x in mine)
            fits = "yes" if all(x["fits"] for x in mine) else "**NO**"
            step = "; ".join(_seconds(x["roofline_s"]) for x in trains) or "- (eval only)"
            hours = f"{estimate['train_h']:.2f}"
            if estimate["eval_h"] is not None:
                hours += f" + {estimate['eval_h']:.2f}"
            grads = (trains or [{"collectives": {}}])[-1]["collectives"].get(
                "all-reduce", {"count": 0, "bytes": 0}
            )
            compile_s = sum(x["compile_s"] for x in mine if not x.get("cached"))
            cached = sum(bool(x.get("cached")) for x in mine)
            out.append(
                f"{name} {kernel} | {_size(hbm)} | {fits} | {step} | {_seconds(ev['roofline_s'])}"
                f" | {hours} | {grads['count']} x, {_size(grads['bytes'])} | {compile_s:.0f} s"
                + (f" ({cached} cached)" if cached else "")
                + " |"
            )
    if head is None:
        return "no compiled point under " + root
    c = head["chip"]
    return "\n".join(
        [
            f"# Every roadmap point compiled for {head['slice']} ({head['chips']} {c['name']} "
            f"chips, {head['hosts']} hosts), without a TPU",
            "",
            f"Command: `{command}` (one `python bench.py ... --aot={head['slice']} --json` per "
            f"point; bench.py --aot). Compiled with jax {head['versions']['jax']}, libtpu "
            f"{head['versions']['libtpu']} on {head['machine']}, {time.strftime('%Y-%m-%d')}.",
            f"Data: {head['data']}.",
            "",
            f"Per chip: HBM is XLA's static total (arguments + outputs - donated + temporaries +"
            f" code), the largest over the point's programs, against {_size(c['hbm_bytes'])} "
            f"({c['source']}). Train step and eval step: roofline time, max(FLOPs / "
            f"{c['peak_flops'] / 1e12:.0f} TFLOP/s, bytes / {c['hbm_bytes_per_s'] / 1e9:.0f} "
            "GB/s), one per curriculum stage. Hours: ESTIMATES, training + evaluations (no "
            "communication, no input pipeline). Compile: the time this point's "
            "programs took to compile here; a program compiled before for another point "
            "(the same lowered text) is read from bench.py --aot's cache. Gradient all-reduce: the "
            "all-reduce "
            f"ops of the (final) train step and their bytes; the params are "
            f"{_size(head['param_bytes'])} at E1.1's size.",
            "",
            "| experiment | point | kernel | HBM per chip | fits | train step | eval step | "
            "hours (train + eval) | gradient all-reduce | compile |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *out,
        ]
    )


def main(argv):
    del argv
    if train.options().retain_host_memory:  # as train.py does; --noretain_host_memory to compare
        train.retain_host_memory()
    if _AOT_TABLE.value:
        print(aot_table(_AOT_TABLE.value, _AOT_COMMAND.value or "./run_all.sh --aot=SLICE ..."))
    elif _AOT.value:
        aot_main(_AOT.value, _JSON.value)
    elif _TORCH_REF.value:
        o = train.options()
        result = side_by_side(train.model_config(o, SUDOKU_META), o.global_batch_size)
        if _JSON.value:
            print(json.dumps(result))
    elif _SCALING.value:
        weak_scaling([int(n) for n in _SCALING.value], _PER_DEVICE_BATCH.value)
    elif _TABLE.value:
        table()
    else:
        run_one()


if __name__ == "__main__":
    app.run(main)
