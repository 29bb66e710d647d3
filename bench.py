"""Benchmarks of the train step, measured in one run (compare only numbers from one run).

  # Weak scaling over fake CPU devices (per-device batch fixed), one process per device count:
  python bench.py --flagfile=configs/sudoku_cpu.flags --scaling=1,2,4,8 --per_device_batch=8

Timings are medians over --steps steps after two warm-up steps (compilation excluded), on a
fixed synthetic batch, so the data pipeline is not part of them.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

import train

_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (median reported)")
_SCALING = flags.DEFINE_list("scaling", [], "device counts for the weak-scaling table")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 8, "rows per device (scaling)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object as the last line")


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


def time_train_step(cfg, batch_size, steps):
    """Median seconds per train step on all local devices, after warm-up."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx, _ = train.optimizer(total_steps=10**6)
    batch = synthetic_batch(cfg, batch_size)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = jax.device_put(batch, rows)
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step, _ = train.make_steps(cfg, mesh, tx, batch_size, ema_rate=0.999)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def weak_scaling(device_counts, per_device_batch):
    """One subprocess per device count (the count is fixed when JAX starts)."""
    rows = []
    for n in device_counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n))
        args = [a for a in sys.argv[1:] if not a.startswith(("--scaling", "--json"))]
        cmd = [
            sys.executable,
            __file__,
            *args,
            "--json",
            f"--global_batch_size={n * per_device_batch}",
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
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
    if _SCALING.value:
        weak_scaling([int(n) for n in _SCALING.value], _PER_DEVICE_BATCH.value)
        return
    meta = {"vocab_size": 11, "seq_len": 81, "num_puzzle_identifiers": 1}
    cfg = train.model_config(meta)
    B = train._GLOBAL_BATCH_SIZE.value
    step_s = time_train_step(cfg, B, _STEPS.value)
    result = {
        "devices": jax.device_count(),
        "global_batch_size": B,
        "train_step_s": step_s,
        "train_examples_per_s": B / step_s,
        "config": {k: str(v) for k, v in vars(cfg).items()},
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    print(
        f"{cfg}\ntrain step: {step_s * 1e3:.1f} ms, {B / step_s:.1f} examples/s "
        f"(batch {B} on {jax.device_count()} {jax.default_backend()} devices)"
    )
    if _JSON.value:
        print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
