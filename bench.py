"""Speed of the train and eval steps against this machine's own matmul peak, in one run.

  # The paper's Sudoku-MLP model at batch 32 in float32 (flags as in train.py):
  python bench.py --flagfile=configs/sudoku_mlp.flags --global_batch_size=32 --forward_dtype=float32
  # A table, one subprocess per row: dtypes x batches x device counts x kernels:
  python bench.py --flagfile=configs/sudoku_mlp.flags --table --dtypes=float32,bfloat16 \
      --batches=32,128 --devices=1,8 --kernels=xla
  # Weak scaling over fake CPU devices (per-device batch fixed):
  python bench.py --flagfile=configs/sudoku_cpu.flags --scaling=1,2,4,8 --per_device_batch=8

Model FLOPs (matmuls only; `model_flops_per_example`), for L = P + S positions, width D,
SwiGLU widths F = swiglu_width(D) and Ft = swiglu_width(L), vocabulary V:
  MLP-mixer block   6*L*D*(Ft + F)            token mixing 2*D*L*3Ft, channel MLP 2*L*D*3F
  attention block   8*L*D*D + 4*L*L*D + 6*L*D*F
  heads             2*S*D*V + 4*D             (lm head on the S cells, q head on position 0)
  train step        layers*(n+1)*(T+2)*block + 3*heads   (T cycles forward, of which the last
                    is differentiated: its backward is two more forward costs)
  eval (N_sup steps) N_sup*(layers*(n+1)*T*block + heads)
For Sudoku-MLP (L=97, D=512, Ft=512, F=1536, T=3, n=6, 2 layers): 42.7 GFLOP per example and
train step. tests/test_tools.py checks the formula against XLA's cost analysis.

MFU = achieved model FLOP/s / peak, where the peak is measured here: the median rate of a
large jnp matmul in the same dtype on one device, accumulated in float32 (for bfloat16 on
XLA:CPU that is the form that reaches its bfloat16 kernels; see kernels.dot). Timings are
medians over --steps steps after warm-up (compilation is timed separately), on a fixed
synthetic batch. The data pipeline is timed alone (`data_batches_per_s`): it must be far
above the step rate.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

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
    "aot", None, "compile for this TPU slice here, without one (e.g. v4-32), and report (aot.py)"
)

SUDOKU_META = {"vocab_size": 11, "seq_len": 81, "num_puzzle_identifiers": 1}


def block_flops(cfg: model.Config) -> int:
    """Matmul FLOPs of one block application on one example (see the module docstring)."""
    L, D, F = cfg.L, cfg.D, model.swiglu_width(cfg.D, cfg.expansion)
    if cfg.mlp_t:
        return 6 * L * D * (model.swiglu_width(L, cfg.expansion) + F)
    return 8 * L * D * D + 4 * L * L * D + 6 * L * D * F


def model_flops_per_example(cfg: model.Config, train_step: bool = True) -> int:
    """Matmul FLOPs per example: one train step (one ACT step, forward and backward), or a
    whole evaluation (N_sup ACT steps, forward only)."""
    heads = 2 * cfg.seq_len * cfg.D * cfg.vocab_size + 4 * cfg.D
    blocks = cfg.layers * (cfg.n + 1)
    if train_step:
        return blocks * (cfg.T + 2) * block_flops(cfg) + 3 * heads
    return cfg.N_sup * (blocks * cfg.T * block_flops(cfg) + heads)


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
    tx, _ = train.optimizer(total_steps=10**6)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = jax.device_put(synthetic_batch(cfg, B), rows)
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step, eval_step = train.make_steps(cfg, mesh, tx, B, ema_rate=0.999)

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
        cfg = train.model_config(SUDOKU_META)
    except ValueError as e:  # a bad flag combination (e.g. --kernel=pallas on CPU)
        raise SystemExit(f"bench.py: {e}") from None
    B = train._GLOBAL_BATCH_SIZE.value
    peak = matmul_peak(cfg.dtype, _PEAK_N.value)
    r = bench(cfg, B, _STEPS.value, _WARMUP.value)
    flops = model_flops_per_example(cfg)
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
        guess = model_flops_per_example(cfg) * B / rate
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
    tx, _ = train.optimizer(total_steps=10**6)
    batch = jax.device_put(synthetic_batch(cfg, B), jax.devices()[0])
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step, _ = train.make_steps(cfg, mesh, tx, B, ema_rate=0.999)

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


def main(argv):
    del argv
    if train._RETAIN_HOST_MEMORY.value:  # as train.py does; --noretain_host_memory to compare
        train.retain_host_memory()
    if _AOT.value:
        import aot  # noqa: PLC0415

        aot.main(_AOT.value, _JSON.value, model_flops_per_example)
    elif _TORCH_REF.value:
        result = side_by_side(train.model_config(SUDOKU_META), train._GLOBAL_BATCH_SIZE.value)
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
