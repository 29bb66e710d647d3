"""kernels.py: the fused mixer kernel (Pallas interpreter) and the XLA path against their jnp
reference, forward and backward, the kernel's lowering for TPU, and training with it."""

import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver

import kernels
import model
import train
from helpers import ROOT, TINY_RUN, assert_close, batch_of, run_flags, run_steps, tiny

TOL = {jnp.float32: (1e-4, 1e-5), jnp.bfloat16: (6e-2, 8e-3)}  # (max, mean) abs error
SUDOKU = dict(L=97, D=512)  # the paper's Sudoku-MLP block: 16 puzzle positions + 81 cells


def block_inputs(B, L, D, dtype, seed=0):
    cfg = model.Config(D=D, seq_len=L, puzzle_emb_ndim=0)
    weights = model.init_params(jax.random.key(seed), cfg)["blocks"][0]
    kx, ki = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (B, L, D)).astype(dtype)
    return x, weights, jax.random.normal(ki, (B, L, D)).astype(dtype)


def assert_errors(actual, expected, dtype, what):
    max_tol, mean_tol = TOL[dtype]
    err = np.abs(np.asarray(actual, np.float32) - np.asarray(expected, np.float32))
    assert err.max() <= max_tol and err.mean() <= mean_tol, (
        f"{what}: max abs err {err.max():.3g} (tol {max_tol}), mean {err.mean():.3g} "
        f"(tol {mean_tol})"
    )


def assert_grads_match(grads, ref_grads, dtype):
    """Same dtypes, and errors within TOL[dtype] relative to each reference gradient's
    largest entry (weight gradients sum over B*L*D)."""
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert g.dtype == r.dtype, jax.tree_util.keystr(path)
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        assert_errors(g / scale, r / scale, dtype, f"grad {jax.tree_util.keystr(path)}")


def probe_loss(block, ct):
    """A loss reading every output of `block(x, w, inj)`: its float32 dot with `ct`."""
    return lambda x, w, i: jnp.vdot(block(x, w, i).astype(jnp.float32), ct.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "B,L,D,injection",
    [(3, 97, 512, True), (4, 13, 32, True), (5, 13, 32, False), (7, 24, 128, True)],
    ids=["sudoku", "tiny", "odd-batch-no-injection", "aligned-L"],
)
def test_forward_matches_the_reference(B, L, D, injection, dtype):
    x, w, inj = block_inputs(B, L, D, dtype)
    inj = inj if injection else None
    out = kernels.mixer_step(x, w, inj, interpret=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_errors(out, kernels.mixer_step_ref(x, w, inj), dtype, f"B={B} L={L} D={D}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B,L,D", [(2, 97, 512), (3, 13, 32)], ids=["sudoku", "tiny"])
def test_gradients_match_the_reference(B, L, D, dtype):
    x, w, inj = block_inputs(B, L, D, dtype)
    ct = jax.random.normal(jax.random.key(9), x.shape).astype(dtype)
    fused = probe_loss(lambda x, w, i: kernels.mixer_step(x, w, i, interpret=True), ct)
    value, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(x, w, inj)
    ref_value, ref_grads = jax.value_and_grad(
        probe_loss(kernels.mixer_step_ref, ct), argnums=(0, 1, 2)
    )(x, w, inj)
    assert_close(value, ref_value, 0, 1e-4 if dtype == jnp.float32 else 2e-2, what="value")
    assert_grads_match(grads, ref_grads, dtype)


def test_explicit_block_sizes_and_their_validation():
    x, w, inj = block_inputs(4, 13, 256, jnp.float32)
    ref = kernels.mixer_step_ref(x, w, inj)
    for bs in [kernels.BlockSizes(1, 128, 128), kernels.BlockSizes(2, 256, 256)]:
        out = kernels.mixer_step(x, w, inj, block_sizes=bs, interpret=True)
        assert_errors(out, ref, jnp.float32, str(bs))
    with pytest.raises(ValueError, match="block_b=3 does not divide the batch B=4"):
        kernels.mixer_step(x, w, block_sizes=kernels.BlockSizes(3, 128, 128), interpret=True)
    with pytest.raises(ValueError, match="block_f=64 must be a multiple of 128 or 768"):
        kernels.mixer_step(x, w, block_sizes=kernels.BlockSizes(1, 128, 64), interpret=True)
    with pytest.raises(ValueError, match="block_d=100 does not divide 256"):
        kernels.mixer_step(x, w, block_sizes=kernels.BlockSizes(1, 100, 128), interpret=True)
    with pytest.raises(ValueError, match="BlockSizes must be positive"):
        kernels.BlockSizes(0, 128, 128)
    with pytest.raises(ValueError, match=r"do not fit x \(4, 12, 256\)"):
        kernels.mixer_step(x[:, :12], w, interpret=True)
    with pytest.raises(ValueError, match="injection"):
        kernels.mixer_step(x, w, inj[:2], interpret=True)


def test_float16_goes_to_the_xla_path():
    """Mosaic does not compile the kernel in float16 (bench.py --aot, TPU v4 and v5e): the
    wrapper refuses it, and --kernel=auto picks the XLA path for it even on TPU."""
    x, w, _ = block_inputs(2, 13, 32, jnp.float16)
    with pytest.raises(ValueError, match="takes float32 or bfloat16, not float16"):
        kernels.mixer_step(x, w, interpret=True)
    assert kernels.choose("auto", "tpu", mlp_t=True, dtype="float16") == "xla"
    assert kernels.choose("auto", "tpu", mlp_t=True, dtype="bfloat16") == "pallas"
    with pytest.raises(ValueError, match="use --kernel=xla"):
        kernels.choose("pallas", "tpu", mlp_t=True, dtype="float16")


def test_auto_takes_the_xla_path_for_a_block_too_wide_for_vmem():
    """E3.1's D=1024 and 1280 keep more weights resident than v4's 16 MiB of VMEM (bench.py
    --aot=v4-32: ~21 MiB at D=1024): --kernel=auto runs them on the XLA path; D=768 and the
    paper's 512 stay fused; an explicit --kernel=pallas is left to fail with the numbers."""
    meta = {"vocab_size": 11, "seq_len": 81, "num_puzzle_identifiers": 1}
    kinds = {}
    for D in (512, 768, 1024, 1280):
        with flagsaver.flagsaver(hidden_size=D, forward_dtype="bfloat16", kernel="auto"):
            kinds[D] = train.model_config(train.options(), meta, "tpu").kernel
    assert kinds == {512: "pallas", 768: "pallas", 1024: "xla", 1280: "xla"}
    with flagsaver.flagsaver(hidden_size=1024, forward_dtype="bfloat16", kernel="pallas"):
        assert train.model_config(train.options(), meta, "tpu").kernel == "pallas"


def test_default_block_sizes_fit_in_vmem():
    """Sudoku-MLP on v4 (16 MiB): bf16 takes 3 rows a step; in f32 the resident weights
    (10 MiB) leave room for 1; a block too large for VMEM is refused with the numbers."""
    for dtype, block_b, budget in [(jnp.bfloat16, 3, kernels.VMEM_BUDGET), (jnp.float32, 1, 1)]:
        bs = kernels.default_block_sizes(96, 97, 512, 512, 1536, dtype)
        assert bs == kernels.BlockSizes(block_b, 256, 512), bs
        assert kernels.vmem_bytes(bs, 96, 97, 512, 512, 1536, dtype) <= budget * kernels.V4_VMEM
    with pytest.raises(ValueError, match=r"needs ~\d+\.\d MiB of VMEM at B=8 L=97 D=1024"):
        kernels.default_block_sizes(8, 97, 1024, 512, 2816, jnp.float32)
    assert kernels.padded_len(97, jnp.float32) == 104
    assert kernels.padded_len(97, jnp.bfloat16) == 112


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_tpu_at_the_sudoku_shape(dtype):
    """Mosaic lowering on CPU (no TPU here): a change that breaks the TPU kernel fails CI."""
    x = jax.ShapeDtypeStruct((96, SUDOKU["L"], SUDOKU["D"]), dtype)
    _, w, _ = block_inputs(1, **SUDOKU, dtype=dtype)

    def train_like(x, w, i):  # forward and backward, as in the gradient cycle
        return jax.value_and_grad(lambda x: kernels.mixer_step(x, w, i).sum())(x)

    for f in (kernels.mixer_step, train_like):
        text = jax.jit(f).trace(x, w, x).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 1, text[:2000]


def test_the_model_lowers_for_tpu_with_the_kernel():
    """The whole training loss and its gradient, Sudoku-MLP config, kernel on: 14 fused
    blocks per cycle, T=3 cycles (2 without gradient)."""
    cfg = model.Config(kernel="pallas")
    params = jax.eval_shape(lambda key: model.init_params(key, cfg), jax.random.key(0))
    batch = jax.eval_shape(lambda: batch_of(jax.random.key(0), B=8))
    carry = jax.eval_shape(lambda b: model.initial_carry(cfg, b), batch)

    grad = jax.grad(train_loss(cfg), has_aux=True)
    lowered = jax.jit(grad).trace(params, carry, batch).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def train_loss(cfg):
    def loss(params, carry, batch):
        return model.loss_fn(params, cfg, carry, batch, train=True, global_batch_size=8)

    return loss


def test_no_residuals_from_the_no_grad_cycles():
    """What autodiff saves for the backward does not grow with T (the T-1 no-gradient cycles
    keep nothing), and a fused block saves only its inputs: far less than the XLA path."""

    def residuals(T, **kernel):
        cfg = tiny(T=T, **kernel)
        params = model.init_params(jax.random.key(0), cfg)
        batch = batch_of(jax.random.key(1))
        carry = model.initial_carry(cfg, batch)
        _, vjp = jax.vjp(lambda p: train_loss(cfg)(p, carry, batch)[0], params)
        return sum(x.size for x in jax.tree.leaves(vjp))  # what the backward will read

    fused = [residuals(T, kernel="pallas", interpret=True) for T in (1, 3)]
    xla = [residuals(T) for T in (1, 3)]
    assert fused[0] == fused[1] and xla[0] == xla[1], (fused, xla)
    assert fused[0] < xla[0] / 4, (fused, xla)


def test_training_with_the_kernel_equals_xla_data_parallel():
    """Inside shard_map on 4 devices, the fused kernel (interpreted) trains like the XLA path."""
    batches = [batch_of(jax.random.key(i), B=8) for i in range(2)]
    xla = run_steps(tiny(), 1, batches)
    fused = run_steps(tiny(kernel="pallas", interpret=True), 4, batches)
    assert_close(fused[0], xla[0], 1e-5, 1e-5, what="losses")
    assert_close(fused[1], xla[1], 1e-5, 1e-4, what="grad norms")
    assert_close(fused[2]["params"]["lm_head"], xla[2]["params"]["lm_head"], 1e-5, 1e-4)


def test_train_py_loss_curve_with_the_kernel_equals_xla(tmp_path):
    def losses(kernel):
        cmd = [sys.executable, "train.py", f"--builtin_dir={tmp_path}"]
        cmd += [f"--workdir={tmp_path / kernel}", f"--kernel={kernel}"]
        cmd += run_flags(
            TINY_RUN,
            builtin_train=40,
            builtin_test=8,
            builtin_aug=2,
            L_cycles=2,
            halt_max_steps=2,
            global_batch_size=8,
            epochs=1,
            eval_interval=1,
        )
        cmd += ["--interpret"] if kernel == "pallas" else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"kernel='{kernel}'" in out.stdout
        logs = [json.loads(line) for line in (tmp_path / kernel / "metrics.jsonl").open()]
        return [m["train/loss"] for m in logs if "train/loss" in m]

    xla, fused = losses("xla"), losses("pallas")
    assert len(xla) == 5  # 40 examples an epoch, batch 8
    assert_close(fused, xla, 1e-5, 1e-5, what="train/loss per step")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kernel=pallas"], "--kernel=pallas is a TPU .Mosaic. kernel and this is cpu"),
        (["--kernel=pallas", "--nomlp_t", "--interpret"], "it needs --mlp_t"),
        (
            ["--kernel=pallas", "--forward_dtype=float16", "--interpret"],
            "--kernel=pallas takes --forward_dtype=float32 or bfloat16, not float16",
        ),
    ],
)
def test_kernel_flag_mistakes(tmp_path, args, message):
    cmd = [sys.executable, "train.py", f"--builtin_dir={tmp_path}", "--builtin_train=4"]
    cmd += ["--builtin_test=4", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.search(message, out.stderr), out.stderr[-2000:]


def xla_path(x, w, inj):  # kernels.mixer_step_xla on the batch-major inputs of the tests
    seq = [None if a is None else a.swapaxes(0, 1) for a in (x, inj)]
    return kernels.mixer_step_xla(seq[0], w, seq[1]).swapaxes(0, 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B,L,D,injection", [(3, 97, 512, True), (5, 13, 32, False)])
def test_xla_path_matches_the_reference(B, L, D, injection, dtype):
    """The sequence-major XLA block and its hand-written backward against the reference's
    forward and autodiff."""
    x, w, inj = block_inputs(B, L, D, dtype)
    inj = inj if injection else None
    ct = jax.random.normal(jax.random.key(9), x.shape).astype(dtype)

    out = xla_path(x, w, inj)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_errors(out, kernels.mixer_step_ref(x, w, inj), dtype, f"B={B} L={L} D={D}")
    args = (0, 1, 2) if injection else (0, 1)
    grads = jax.grad(probe_loss(xla_path, ct), argnums=args)(x, w, inj)
    ref_grads = jax.grad(probe_loss(kernels.mixer_step_ref, ct), argnums=args)(x, w, inj)
    assert_grads_match(grads, ref_grads, dtype)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.mixer_step_xla(x.swapaxes(0, 1)[:, :, :8], w)


@pytest.mark.parametrize("varying", ["x", "weights"])
def test_xla_path_gradients_under_shard_map(varying):
    """Inside shard_map on 2 devices, with either the activations or the weights varying
    over the devices and the other replicated, the hand-written backward gives the
    reference's gradients, in the primals' types (summed over devices where replicated)."""
    x, w, inj = block_inputs(4, 13, 32, jnp.float32)
    ct = jax.random.normal(jax.random.key(7), x.shape)
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec()

    def loss(block, x, w, inj):
        if varying == "weights":
            w = jax.tree.map(lambda p: jax.lax.pcast(p, "d", to="varying"), w)
        else:
            x = jax.lax.pcast(x, "d", to="varying")
        return jax.lax.psum(jnp.vdot(block(x, w, inj), ct), "d")  # each device: the whole loss

    def grads(block):
        per_device = jax.grad(functools.partial(loss, block), argnums=(0, 1, 2))
        return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))(
            x, w, inj
        )

    got, want = grads(xla_path), grads(kernels.mixer_step_ref)
    assert_grads_match(got, want, jnp.float32)


def dots_of(hlo_text):
    """(output shape, lhs shape, rhs shape, contracting dims) of every dot in an optimised HLO
    module's text, shapes as written there (e.g. "bf16[32,13]{1,0}")."""
    shapes = dict(re.findall(r"%(\S+) = (\w+\[[^\]]*\]\{[^}]*\})", hlo_text))
    dots = re.findall(
        r"= (\w+\[[^\]]*\]\{[^}]*\}) dot\(%([^,]+), %([^)]+)\), "
        r"lhs_contracting_dims=\{(\d+)\}, rhs_contracting_dims=\{(\d+)\}",
        hlo_text,
    )
    return [(out, shapes[a], shapes[b], (int(i), int(j))) for out, a, b, i, j in dots]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul libraries")
@pytest.mark.parametrize("B,L,D", [(2, 13, 32), (2, 97, 512)])
def test_bf16_xla_path_matmuls_stay_bf16_on_cpu(B, L, D):
    """In bfloat16, every matmul of the XLA block, forward and backward, has the one form
    XLA:CPU sends to its bfloat16 kernels (5-8x its float32 rate on the project's CPU):
    bf16 x bf16 -> f32, row-major operands, (M, K) @ (K, N). A transposed operand, or a
    bf16 -> bf16 matmul, makes XLA upcast it to float32 instead. The only float32 matmuls
    left are the RMSNorm means over L, ones (1, L) @ (L, B*D). How many dots XLA leaves
    (it may merge or split them) is its business; the form of each is what counts. Compiled
    only: the values are checked by test_xla_path_matches_the_reference."""
    x, w, inj = block_inputs(B, L, D, jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(9), x.shape).astype(jnp.bfloat16)
    grad = jax.jit(jax.grad(probe_loss(xla_path, ct), argnums=(0, 1, 2)))
    dots = dots_of(grad.lower(x, w, inj).compile().as_text())
    mean = (f"f32[1,{B * D}]{{1,0}}", f"f32[{L},1]{{1,0}}", f"f32[{L},{B * D}]{{1,0}}", (0, 0))
    block = [d for d in dots if d != mean]
    assert block, dots  # the block's matmuls are dots of the module, not gone elsewhere
    for out, lhs, rhs, contracting in block:
        assert out.startswith("f32[") and out.endswith("{1,0}"), (out, lhs, rhs)
        assert lhs.startswith("bf16[") and rhs.startswith("bf16["), (out, lhs, rhs)
        assert lhs.endswith("{1,0}") and rhs.endswith("{1,0}"), (out, lhs, rhs)
        assert contracting == (1, 0), (out, lhs, rhs, contracting)
