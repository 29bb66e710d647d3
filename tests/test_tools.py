"""bench.py: its figures and its FLOP count."""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.extend.core
import pytest
from absl.testing import flagsaver

import bench
import model
import train
from helpers import ROOT, SMALL_MODEL, batch_of, run_flags, tiny


def run(cmd, **env):
    return subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=dict(os.environ, **env)
    )


def test_bench_json_reports_every_figure():
    """Every figure is there and positive; the model FLOPs are the matmuls of the train step
    (counted here from its jaxpr), the FLOP rate is those FLOPs at the measured examples/s,
    the MFU is a fraction, and the timings fit in the wall time of the run."""
    t0 = time.perf_counter()
    out = run(
        [
            sys.executable,
            "bench.py",
            *run_flags(SMALL_MODEL, global_batch_size=4),
            "--steps=1",
            "--peak_n=256",
            "--json",
        ],
        JAX_PLATFORMS="cpu",
    )
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MFU" in out.stdout and "examples/s" in out.stdout
    assert "train: step 1/" in out.stderr and "ETA" in out.stderr  # progress lines
    result = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ["train_examples_per_s", "eval_examples_per_s", "model_flops_per_example"]
    keys += ["achieved_flops_per_s", "peak_flops_per_s", "mfu", "peak_memory_bytes", "compile_s"]
    assert all(result[k] > 0 for k in keys), result
    assert result["global_batch_size"] == 4 and result["config"]["D"] == "16"
    with flagsaver.flagsaver(**SMALL_MODEL):
        cfg = train.model_config(train.options(), bench.SUDOKU_META)
    assert result["config"] == {k: str(v) for k, v in vars(cfg).items()}  # the model bench ran
    flops = matmul_flops(train_step_jaxpr(cfg))
    assert 0.99 < result["model_flops_per_example"] / flops <= 1.0, (result, flops)
    achieved = result["train_examples_per_s"] * flops
    assert abs(result["achieved_flops_per_s"] / achieved - 1) < 0.01, (result, achieved)
    assert 0 < result["mfu"] <= 1.5, result
    assert result["compile_s"] + result["train_step_s"] < wall, (result, wall)
    assert result["data_batches_per_s"] > 1 / result["train_step_s"]


def test_bench_kernel_on_cpu_is_a_clear_error():
    out = run([sys.executable, "bench.py", "--kernel=pallas"], JAX_PLATFORMS="cpu")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "bench.py: --kernel=pallas is a TPU (Mosaic) kernel" in out.stderr


@pytest.mark.parametrize("mlp_t", [True, False], ids=["mlp", "attention"])
def test_model_flops_match_xla_cost_analysis(mlp_t):
    """XLA's count of the train step's FLOPs (matmuls plus elementwise ops) is the formula's
    (matmuls only) plus a few percent: the matmuls are nearly all the work. XLA counts a
    while loop's body once whatever its trip count, so no loop runs more than once here
    (T = 1, n = 1); the loops are counted in test_model_flops_match_the_jaxpr."""
    cfg = tiny(T=1, n=1, D=64, heads=4, puzzle_emb_ndim=64, mlp_t=mlp_t)
    params = model.init_params(jax.random.key(0), cfg)
    batch = batch_of(jax.random.key(1), B=4)
    carry = model.initial_carry(cfg, batch)

    def loss(params):
        return model.loss_fn(params, cfg, carry, batch, train=True, global_batch_size=4)[0]

    xla = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]
    ours = 4 * model.flops_per_example(cfg)
    assert 1.0 <= xla / ours < 1.04, (xla, ours)


def train_step_jaxpr(cfg):
    """The jaxpr of the gradient of the train-mode loss for one example (traced, not compiled)."""
    batch = jax.eval_shape(lambda: batch_of(jax.random.key(0), B=1))
    params = jax.eval_shape(lambda key: model.init_params(key, cfg), jax.random.key(0))
    carry = jax.eval_shape(lambda b: model.initial_carry(cfg, b), batch)

    def loss(params, carry, batch):
        return model.loss_fn(params, cfg, carry, batch, train=True, global_batch_size=1)[0]

    return jax.make_jaxpr(jax.grad(loss))(params, carry, batch).jaxpr


def matmul_flops(jaxpr):
    """2*M*N*K summed over every dot_general of a jaxpr and of the jaxprs inside it (jit,
    custom_vjp and custom_jvp calls, scan bodies), a scan body counted `length` times. A while
    loop or a cond fails: the jaxpr does not say how often it runs."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        assert name not in ("while", "cond"), f"{name}: its trip count is not in the jaxpr"
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
            continue
        times = eqn.params["length"] if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                inner = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += times * matmul_flops(inner)
    return total


@pytest.mark.parametrize(
    "cfg",
    [
        model.Config(),
        *(tiny(T=T, n=n, D=64, heads=4, puzzle_emb_ndim=64, mlp_t=mlp_t)
          for T, n in ((1, 1), (2, 3)) for mlp_t in (True, False)),
    ],
    ids=["sudoku_mlp", "T1n1-mlp", "T1n1-attention", "T2n3-mlp", "T2n3-attention"],
)  # fmt: skip
def test_model_flops_match_the_jaxpr(cfg):
    """model.flops_per_example against the matmuls of the train step itself: every
    dot_general of the jaxpr of the loss's gradient, each loop's body times its trip count.
    That count has the T-1 no-gradient cycles, the differentiated cycle and its backward
    (the XLA block's hand-written one, or autodiff's), and the heads; the formula counts the
    block and head matmuls (forward, and twice that for the backward of the last cycle).
    Neither counts elementwise ops, reductions or gathers; the jaxpr also has the RMSNorm
    means that the XLA block's backward computes as matmuls (0.01-0.05% more). For
    Sudoku-MLP (E1.1: D=512, T=3, n=6) the count is the 42.7 GFLOP per example that
    bench.py's help and docs/PERFORMANCE.md quote."""
    counted = matmul_flops(train_step_jaxpr(cfg))
    formula = model.flops_per_example(cfg)
    assert 1.0 <= counted / formula < 1.01, (counted, formula)
    if cfg == model.Config():
        assert round(counted / 1e9, 1) == 42.7, counted


FAKE_LOSSES = """
import torch

class ACTLossHead(torch.nn.Module):  # the official code's interface, on a one-weight model
    def __init__(self, model, loss_type):
        super().__init__()
        self.model = model

    def initial_carry(self, batch):
        return None

    def forward(self, carry, batch, return_keys):
        return carry, self.model(batch["inputs"]).square().sum(), {}, {}, True
"""
FAKE_TRM = """
import torch

class TinyRecursiveReasoningModel_ACTV1(torch.nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(arch["vocab_size"], dtype=torch.float32))

    def forward(self, inputs):
        return self.w[inputs.long()]
"""


def test_bench_side_by_side_with_a_stand_in_for_the_official_code(tmp_path):
    """--torch_ref's protocol (spawned worker, alternating rounds, progress lines, the
    speedup line), on a stand-in for the official code's two modules; needs torch."""
    pytest.importorskip("torch")
    (tmp_path / "models" / "recursive_reasoning").mkdir(parents=True)
    (tmp_path / "models" / "losses.py").write_text(FAKE_LOSSES)
    (tmp_path / "models" / "recursive_reasoning" / "trm.py").write_text(FAKE_TRM)
    flags = run_flags(SMALL_MODEL, global_batch_size=4)
    flags += ["--steps=1", "--rounds=2", "--warmup=0", f"--torch_ref={tmp_path}"]
    out = run([sys.executable, "bench.py", *flags], JAX_PLATFORMS="cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "official code: warm-up step" in out.stderr and "round 2/2: trmx" in out.stderr
    assert "trmx warm-up: step 1/1" in out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("float32, batch 4: trmx ") and "medians of 2 alternating" in line
