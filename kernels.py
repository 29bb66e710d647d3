"""The TRM-MLP block as one fused Pallas TPU kernel, with its jnp reference below it.

The Sudoku-MLP TRM applies one MLP-mixer block 42 times per ACT step forward (T=3 cycles of
n=6 z-updates and one y-update, through 2 layers). As separate ops, each block passes the
(B, L, D) activations (or its wider SwiGLU intermediates) through HBM about ten times: the
injection add, the transpose into (B, D, L), the token-mixing SwiGLU (two matmuls and the
gate) with its residual and norm over L, the transpose back, the channel SwiGLU with its
residual and norm over D. `mixer_step` keeps a tile of
`block_b` rows in VMEM through the whole block: it reads x (and the injection) once and
writes the result once.

Layout. No transposes: in the natural (L, D) layout of one row, mixing over L is a left
multiplication, gate|up = Wtok_gu^T (2Ft, L) @ x (L, D) and back = Wtok_down^T (L, Ft) @ a,
so the wrapper passes the two small token weights transposed. The channel SwiGLU runs on the
tile flattened to (block_b * L, D) rows, over `block_f` columns of its hidden width at a time
(f32 accumulator), so its (rows, F) intermediate never exists whole.

Padding. L is padded with zero rows to a multiple of the sublane tile (8 rows of 32 bits;
16 for bf16), the token weights with zeros to match. Padding rows stay exactly zero through
the block (no biases; SwiGLU(0) = 0; RMSNorm(0) = 0), and the norm over L divides by the true
L, so padding changes no value. Sudoku: L = 16 + 81 = 97 -> 104 (f32) / 112 (bf16).

Grid: (B / block_b,), "parallel" (v4 megacore splits it over its two TensorCores). Weights
are whole blocks with a constant index map and a single buffer (`pl.Buffered(1)`): fetched
once, resident across grid steps.

VMEM budget (`vmem_bytes`; v4 has 16 MiB per TensorCore, v5e/v6e 128 MiB), Sudoku-MLP
(D=512, L=97 -> Lp=112, Ft=512, F=1536) in bf16, block_b = bb rows a step:
  weights, one buffer          2 * (3*512*112 + 3*1536*512)          = 4.83 MiB
  x, injection, out tiles      3 arrays * 2 buffers * 2 * bb*112*512  = 0.66 MiB * bb
  h scratch                    2 * bb*112*512                         = 0.11 MiB * bb
  token-mix f32 temporaries    4 * (3*512 + 2*112) * block_d=256      = 1.72 MiB
  channel f32 temporaries      4 * (2*block_f + 2*512) * bb*112       = 0.88 MiB * bb
  -> 6.55 MiB + 1.64 MiB * bb. `default_block_sizes` takes the largest bb (dividing B, at
  most 8) within 80% of VMEM: bb=3 on v4 (11.5 MiB); the VMEM limit asked of Mosaic is the
  estimate + 25% + 2 MiB. In f32 the weights alone are 9.7 MiB: bb=1 (13.5 MiB) on v4.

HBM traffic per block application, bf16, per row (L*D*2 bytes = 97 KiB at Sudoku size):
unfused, the block's ops read and write the activations about 10 times (injection add, two
transposes, two matmul-SwiGLU-matmul chains with their residual adds and norms); XLA fuses
the elementwise ops into its matmuls' prologues and epilogues, which removes some of
those passes, not all. The kernel reads x and the injection and writes the result: 3 passes,
plus a pad and a slice of L in XLA around it (~4 more, cheap copies), and reads the weights
(5 MiB) once per call rather than once per fused op. This is arithmetic: nothing here has run
on a TPU; `python bench.py --kernel=pallas` on one measures it.

Backward: `jax.custom_vjp` whose backward recomputes the block with the jnp reference and
takes its VJP (activations are recomputed, not stored: the residuals are the inputs). The
T-1 no-gradient cycles never call the backward and keep nothing. A Pallas backward kernel is
future work, worth it only if measured faster on a TPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128  # TPU vreg: 8 sublanes x 128 lanes of 32 bits
NUM_SUBLANES = 8
V4_VMEM = 16 * 2**20  # per TensorCore; the smallest of v4, v5e, v5p, v6e
VMEM_BUDGET = 0.8  # of the VMEM, for the tiles picked by default (Mosaic needs some itself)
WEIGHT_NAMES = ("token_gate_up", "token_down", "gate_up", "down")
# Activation dtypes the kernel takes. float16: Mosaic fails with "Invalid vector type for
# load" when compiling it for TPU v4 and v5e (bench.py --aot); the XLA path runs it.
KERNEL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `mixer_step`: `block_b` rows per grid step; the token mixing works on
    `block_d` of the D columns at a time, the channel SwiGLU on `block_f` of its F."""

    block_b: int
    block_d: int
    block_f: int

    def __post_init__(self):
        if min(self.block_b, self.block_d, self.block_f) < 1:
            raise ValueError(f"BlockSizes must be positive, got {self}")

    def validate(self, B: int, D: int, F: int):
        if B % self.block_b:
            raise ValueError(f"block_b={self.block_b} does not divide the batch B={B}")
        for name, block, full in (("block_d", self.block_d, D), ("block_f", self.block_f, F)):
            if full % block:
                raise ValueError(f"{name}={block} does not divide {full}")
            if block != full and block % NUM_LANES:
                raise ValueError(f"{name}={block} must be a multiple of {NUM_LANES} or {full}")


def padded_len(L: int, dtype) -> int:
    """L rounded up to whole sublane tiles (16 rows for 16-bit dtypes, 8 for 32-bit)."""
    rows = NUM_SUBLANES * 4 // jnp.dtype(dtype).itemsize
    return -(-L // rows) * rows


def vmem_bytes(bs: BlockSizes, B, L, D, Ft, F, dtype, injection=True) -> int:
    """Estimated VMEM of one grid step (see the module docstring for the terms)."""
    Lp, item = padded_len(L, dtype), jnp.dtype(dtype).itemsize
    weights = (3 * Ft * Lp + 3 * F * D) * item  # single-buffered
    tiles = (3 if injection else 2) * 2 * bs.block_b * Lp * D * item  # double-buffered
    scratch = bs.block_b * Lp * D * item
    token_tmp = (3 * Ft + 2 * Lp) * bs.block_d * 4
    channel_tmp = (2 * bs.block_f + 2 * D) * bs.block_b * Lp * 4
    return weights + tiles + scratch + token_tmp + channel_tmp


def target_platform() -> str:
    """The platform being traced for: that of the mesh's devices inside shard_map (a TPU
    slice when bench.py --aot compiles for one on a CPU machine), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def vmem_capacity() -> int:
    """VMEM per TensorCore of the TPU traced for (`target_platform`; under shard_map that of
    the mesh's chips, e.g. 128 MiB for v5e or v6e); v4's (the smallest) when the target is
    not a TPU (interpret mode)."""
    if target_platform() == "tpu":
        return pltpu.get_tpu_info().vmem_capacity_bytes
    return V4_VMEM


def _tiles(D, F):
    """(block_d, block_f): the token-mixing and channel-MLP tiles of the fused block."""
    return next((d for d in (256, 128) if D % d == 0), D), next(
        (f for f in (512, 256, 128) if F % f == 0), F
    )


def fits_vmem(L, D, Ft, F, dtype) -> bool:
    """Whether the fused block fits the VMEM of the TPU traced for (`vmem_capacity`) with one
    row per grid step. Its weights stay resident, so a wide block (D=1024 in bfloat16 on v4)
    does not fit at any batch; --kernel=auto takes the XLA path for it."""
    bs = BlockSizes(1, *_tiles(D, F))
    return vmem_bytes(bs, 1, L, D, Ft, F, dtype) <= vmem_capacity()


def choose(requested, platform, *, mlp_t, dtype, interpret=False, fits=True) -> str:
    """--kernel's choice for the MLP-mixer block on `platform` (the one compiled for): "auto"
    takes the fused kernel on TPU for the MLP-mixer in a KERNEL_DTYPES `dtype` (a name) that
    `fits` VMEM (fits_vmem), the XLA path elsewhere (CPU, GPU, attention, float16, a block
    too wide); an explicit "pallas" that cannot run is a ValueError saying why."""
    fusable = dtype in KERNEL_DTYPES
    if requested == "auto":
        return "pallas" if platform == "tpu" and mlp_t and fusable and fits else "xla"
    if requested == "pallas" and not mlp_t:
        raise ValueError("--kernel=pallas fuses the MLP-mixer block: it needs --mlp_t")
    if requested == "pallas" and not fusable:
        raise ValueError(
            f"--kernel=pallas takes --forward_dtype={' or '.join(KERNEL_DTYPES)}, not {dtype} "
            "(Mosaic does not compile it): use --kernel=xla"
        )
    if requested == "pallas" and platform != "tpu" and not interpret:
        raise ValueError(
            f"--kernel=pallas is a TPU (Mosaic) kernel and this is {platform}: use --kernel=xla,"
            " or add --interpret to run it in the Pallas interpreter (slow; for tests)"
        )
    return requested


def default_block_sizes(B, L, D, Ft, F, dtype, injection=True) -> BlockSizes:
    """The largest block_b (a divisor of B, at most 8) whose VMEM estimate fits the budget."""
    block_d, block_f = _tiles(D, F)
    capacity = vmem_capacity()
    fits = [
        b
        for b in range(1, min(B, 8) + 1)
        if B % b == 0
        and vmem_bytes(BlockSizes(b, block_d, block_f), B, L, D, Ft, F, dtype, injection)
        <= VMEM_BUDGET * capacity
    ]
    bs = BlockSizes(max(fits, default=1), block_d, block_f)
    need = vmem_bytes(bs, B, L, D, Ft, F, dtype, injection)
    if need > capacity:
        raise ValueError(
            f"The fused mixer block needs ~{need / 2**20:.1f} MiB of VMEM at B={B} L={L} D={D} "
            f"F={F} {jnp.dtype(dtype).name}, more than the {capacity / 2**20:.0f} MiB there are:"
            + (" use bfloat16 or" if jnp.dtype(dtype) == jnp.float32 else " use")
            + " the XLA path (--kernel=xla)"
        )
    return bs


def _mixer_kernel(*refs, L, eps, block_d, block_f, has_injection):
    # inputs:  x_ref, inj_ref (block_b, Lp, D)   [inj_ref only with an injection]
    #          tgu_ref (2Ft, Lp)  token gate|up, transposed;  td_ref (Lp, Ft) token down^T
    #          gu_ref (D, 2F)     channel gate|up;            d_ref (F, D) channel down
    # outputs: o_ref (block_b, Lp, D)
    # scratch: h_ref (block_b, Lp, D): the tile after the token-mixing half
    if has_injection:
        x_ref, inj_ref, tgu_ref, td_ref, gu_ref, d_ref, o_ref, h_ref = refs
    else:
        x_ref, tgu_ref, td_ref, gu_ref, d_ref, o_ref, h_ref = refs
    block_b, Lp, D = x_ref.shape
    Ft, F, dtype = td_ref.shape[1], d_ref.shape[0], x_ref.dtype

    def dot(a, b):  # MXU matmul, f32 accumulation, rounded to the activation dtype
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)

    def glu(gate, up):  # silu(gate) * up, in f32 (v4 has no bf16 VPU), rounded once
        gate = gate.astype(jnp.float32)
        return (gate * jax.nn.sigmoid(gate) * up.astype(jnp.float32)).astype(dtype)

    def token_mix(i, carry):  # one row: SwiGLU over L + residual + RMSNorm over the true L
        for d in range(0, D, block_d):  # columns are independent here: block_d at a time
            cols = pl.ds(d, block_d)
            x = x_ref[i, :, cols] + inj_ref[i, :, cols] if has_injection else x_ref[i, :, cols]
            a = glu(dot(tgu_ref[:Ft, :], x), dot(tgu_ref[Ft:, :], x))  # (Ft, block_d)
            h = (x + dot(td_ref[...], a)).astype(jnp.float32)  # (Lp, block_d)
            ms = jnp.sum(h * h, axis=0, keepdims=True) / L  # zero padding rows add nothing
            h_ref[i, :, cols] = (h * jax.lax.rsqrt(ms + eps)).astype(dtype)
        return carry

    jax.lax.fori_loop(0, block_b, token_mix, 0)

    h = h_ref[...].reshape(block_b * Lp, D)  # Lp is whole sublane tiles: a free reshape
    acc = jnp.zeros((block_b * Lp, D), jnp.float32)
    for f in range(0, F, block_f):  # the channel SwiGLU, block_f hidden columns at a time
        a = glu(dot(h, gu_ref[:, f : f + block_f]), dot(h, gu_ref[:, F + f : F + f + block_f]))
        acc += jnp.dot(a, d_ref[f : f + block_f, :], preferred_element_type=jnp.float32)
    out = (h + acc.astype(dtype)).astype(jnp.float32)
    out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + eps)
    o_ref[...] = out.astype(dtype).reshape(block_b, Lp, D)


def _pallas_forward(x, injection, weights, eps, block_sizes, interpret):
    B, L, D = x.shape
    Ft, F = weights["token_down"].shape[0], weights["down"].shape[0]
    dtype, Lp = x.dtype, padded_len(L, x.dtype)
    bs = block_sizes or default_block_sizes(B, L, D, Ft, F, dtype, injection is not None)
    bs.validate(B, D, F)
    w = {k: v.astype(dtype) for k, v in weights.items()}  # as the reference casts them
    pad_rows = ((0, 0), (0, Lp - L), (0, 0))
    tiles = [jnp.pad(x, pad_rows)] + ([] if injection is None else [jnp.pad(injection, pad_rows)])
    token_gu_T = jnp.pad(w["token_gate_up"], ((0, Lp - L), (0, 0))).T  # (2Ft, Lp)
    token_down_T = jnp.pad(w["token_down"], ((0, 0), (0, Lp - L))).T  # (Lp, Ft)

    tile = pl.BlockSpec((bs.block_b, Lp, D), lambda i: (i, 0, 0))

    def resident(shape):  # fetched once: constant block index, one buffer
        return pl.BlockSpec(shape, lambda i: (0, 0), pipeline_mode=pl.Buffered(1))

    estimate = vmem_bytes(bs, B, L, D, Ft, F, dtype, injection is not None)
    flops = 2 * B * (3 * Ft * Lp * D + 3 * Lp * D * F)
    out = pl.pallas_call(
        functools.partial(
            _mixer_kernel,
            L=L,
            eps=eps,
            block_d=bs.block_d,
            block_f=bs.block_f,
            has_injection=injection is not None,
        ),
        # Under shard_map the output varies over the mesh axes as x does.
        out_shape=jax.ShapeDtypeStruct((B, Lp, D), dtype, manual_axis_type=jax.typeof(x).mat),
        grid=(B // bs.block_b,),
        in_specs=[tile] * len(tiles)
        + [resident(a.shape) for a in (token_gu_T, token_down_T, w["gate_up"], w["down"])],
        out_specs=tile,
        scratch_shapes=[pltpu.VMEM((bs.block_b, Lp, D), dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",),
            vmem_limit_bytes=min(vmem_capacity(), int(1.25 * estimate) + 2**21),
        ),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=B * Lp * (Ft + F),
            bytes_accessed=(len(tiles) + 1) * x.size * x.dtype.itemsize
            + sum(v.size * v.dtype.itemsize for v in w.values()),
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*tiles, token_gu_T, token_down_T, w["gate_up"], w["down"])
    return out[:, :L]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x, injection, weights, eps, block_sizes, interpret):
    return _pallas_forward(x, injection, weights, eps, block_sizes, interpret)


def _fused_fwd(x, injection, weights, eps, block_sizes, interpret):
    out = _pallas_forward(x, injection, weights, eps, block_sizes, interpret)
    return out, (x, injection, weights)  # inputs only: the backward recomputes


def _fused_bwd(eps, block_sizes, interpret, residuals, g):
    x, injection, weights = residuals
    _, vjp = jax.vjp(lambda x, i, w: mixer_step_ref(x, w, i, eps=eps), x, injection, weights)
    return vjp(g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def check_shapes(x, weights, injection=None):
    """ValueError naming the shapes when x, the injection and the weights do not fit."""
    if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float (B, L, D) array, got {x.dtype}{list(x.shape)}")
    if sorted(weights) != sorted(WEIGHT_NAMES):
        raise ValueError(f"weights must have keys {WEIGHT_NAMES}, got {sorted(weights)}")
    _, L, D = x.shape
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    Ft, F = shapes["token_down"][0], shapes["down"][0]
    want = {"token_gate_up": (L, 2 * Ft), "token_down": (Ft, L), "gate_up": (D, 2 * F)}
    want["down"] = (F, D)
    if shapes != want:
        raise ValueError(f"weights {shapes} do not fit x {x.shape}: expected {want}")
    if injection is not None and injection.shape != x.shape:
        raise ValueError(f"injection {injection.shape} must have the shape of x {x.shape}")


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def mixer_step(x_BxLxD, weights, injection_BxLxD=None, *, eps=1e-5, block_sizes=None,
               interpret=False):  # fmt: skip
    """One TRM MLP-mixer block, fused: `mixer_step_ref` in one Pallas kernel.

    Args:
      x_BxLxD: activations, float32 or bfloat16 (the output has the same dtype).
      weights: {"token_gate_up": (L, 2Ft), "token_down": (Ft, L), "gate_up": (D, 2F),
        "down": (F, D)}, any float dtype (cast to x's, as the reference does).
      injection_BxLxD: optional; added to x first (TRM's input injection), in the kernel.
      eps: RMSNorm epsilon.
      block_sizes: `BlockSizes`; default `default_block_sizes(...)`.
      interpret: run the kernel in Pallas' interpreter (any backend, e.g. CPU tests).
    Returns:
      (B, L, D): the block's output.
    """
    check_shapes(x_BxLxD, weights, injection_BxLxD)
    if x_BxLxD.dtype.name not in KERNEL_DTYPES:
        raise ValueError(
            f"The fused mixer block takes {' or '.join(KERNEL_DTYPES)}, not {x_BxLxD.dtype}: "
            "use the XLA path (--kernel=xla)"
        )
    return _fused(x_BxLxD, injection_BxLxD, weights, eps, block_sizes, interpret)


def mixer_step_ref(x_BxLxD, weights, injection_BxLxD=None, *, eps=1e-5):
    """The same block in plain jnp (the test oracle and the fused kernel's VJP), as the
    reference writes it: mix over L on the transposed (B, D, L) view, then over D."""
    h = x_BxLxD if injection_BxLxD is None else x_BxLxD + injection_BxLxD
    h_BxDxL = h.swapaxes(1, 2)
    token_mix = swiglu(h_BxDxL, weights["token_gate_up"], weights["token_down"])
    h = rms_norm(h_BxDxL + token_mix, eps).swapaxes(1, 2)
    return rms_norm(h + swiglu(h, weights["gate_up"], weights["down"]), eps)


def rms_norm(x, eps, axis=-1):
    """RMSNorm without a scale (post-norm, as in the reference), computed in float32."""
    return (x.astype(jnp.float32) * rms_scale(x, axis, eps)).astype(x.dtype)


def rms_scale(x, axis, eps):
    """1 / RMS(x) over `axis` (the last, or 0 of a 2-D array), in float32, the axis kept."""
    x = x.astype(jnp.float32)
    return jax.lax.rsqrt(_mean(x * x, axis) + eps)


def swiglu(x, gate_up, down):
    """SwiGLU over x's last axis, down(silu(gate) * up), gate and up from one matmul; the
    weights are cast to x's dtype, as the reference casts them."""
    gate, up = jnp.split(x @ gate_up.astype(x.dtype), 2, axis=-1)
    return glu(gate, up) @ down.astype(x.dtype)


def glu(gate, up):
    """SwiGLU's gate, silu(gate) * up, in the operands' dtype."""
    return jax.nn.silu(gate) * up


# ----------------------------------------------------------------------------- the XLA path
#
# What `model.py` runs when the Pallas kernel is off (`--kernel=xla`, the CPU and GPU path).
# The same block as `mixer_step_ref`, laid out for XLA's matmul libraries:
#
# Layout. Activations are sequence-major, (L, B, D). Mixing over L is then one plain matmul,
# Wtok^T (2Ft, L) @ h (L, B*D), and mixing over D another, h (L*B, D) @ W (D, F): no
# transposes of the activations anywhere (the reference's (B, D, L) view costs two per
# block, and its (B*D, L) @ (L, 2Ft) runs at half the speed of the sequence-major form on
# XLA:CPU). The gate and up halves of each SwiGLU are two matmuls: (Ft, L) @ (L, B*D)
# twice was faster in float32 than (2Ft, L) @ (L, B*D) then a slice (the slice is a copy).
#
# bfloat16. Matmuls take bfloat16 operands and accumulate and return float32 (`dot`), in
# the plain (M, K) @ (K, N) form (`_t`): that is what reaches XLA:CPU's bfloat16 (AMX)
# kernels, several times its float32 rate on CPUs with AMX (docs/PERFORMANCE.md). Results
# that feed only elementwise
# math (the SwiGLU halves, the pre-norm sums) stay float32; what feeds a matmul or leaves
# the block is rounded to bfloat16 once. The reference rounds every matmul output to
# bfloat16, so this path is, if anything, more precise. The saved SwiGLU halves and
# pre-norm sums are float32, twice their bfloat16 size; XLA keeps fewer rounded copies, so
# the step's peak memory does not grow.
#
# Backward. Written by hand (`jax.custom_vjp`), from saved activations (the SwiGLU
# pre-activations, the products fed to the down projections, the pre-norm sums): the
# SwiGLU and RMSNorm derivatives are computed in float32 in one elementwise pass each; in
# the token mixing the gate and up gradients are concatenated (rows, which XLA fuses into
# that pass) so that its weight gradient and input gradient are one matmul each.
#
# Measured with `python bench.py`: docs/PERFORMANCE.md.


def dot(a, b):
    """a @ b (2-D), accumulated and returned in float32.

    For bfloat16 operands that is what XLA computes for a plain bfloat16 `a @ b` anyway
    (then rounded), but not how fast: XLA:CPU rewrites a bfloat16 -> bfloat16 matmul into a
    float32 one, while bfloat16 -> float32 goes to YNNPACK's bfloat16 (AMX) kernels, several
    times faster where the CPU has them (docs/PERFORMANCE.md). In float32 it is a plain
    matmul."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _silu_glu_grad(d_out, gate, up):
    """(d gate, d up) of silu(gate) * up, in float32."""
    d_out, gate, up = (a.astype(jnp.float32) for a in (d_out, gate, up))
    sig = jax.nn.sigmoid(gate)
    return d_out * up * sig * (1 + gate * (1 - sig)), d_out * gate * sig


def _rms_norm_grad(d_out, s, scale, axis):
    """The gradient through s -> s * scale(s) (RMSNorm, no weight), in float32."""
    y = s.astype(jnp.float32) * scale
    d_out = d_out.astype(jnp.float32)
    return scale * (d_out - y * _mean(d_out * y, axis))


def _mean(a, axis):
    """Mean over axis 0 or the last axis of a 2-D array, keeping the axis. Over axis 0 it is
    a matmul: XLA:CPU hands that reduction to YNNPACK, whose rounding was seen to change with
    the number of devices sharing the process (4 fake devices in one process trained unlike
    1 device or 2 processes x 2: tests/test_distributed.py); a matmul's does not."""
    if axis == 0:
        return jnp.dot(jnp.full((1, a.shape[0]), 1 / a.shape[0], a.dtype), a)
    return jnp.mean(a, axis, keepdims=True)


def _t(a, dtype, barrier=False):
    """a.T (2-D), for matmuls whose operands are `dtype`.

    float32: the plain transpose, which XLA folds into the matmul that reads it (fastest);
    behind a barrier if `barrier`: a token-mixing weight whose transpose was folded into
    its matmul was seen to round differently for different widths of the other operand
    when several devices shared the process (the token mixing of 8 devices x 2 rows then
    differed from 1 device x 16 rows: tests/test_train.py).

    bfloat16 for CPU (`target_platform`): materialised row-major, so that the matmul is a
    plain (M, K) @ (K, N), the only form YNNPACK's bfloat16 kernels take (see `dot`):
    XLA:CPU upcasts any other to float32 first, at a fifth to an eighth of the speed. The
    barriers keep XLA from folding the transpose into the matmul that reads it or the one
    that made `a`; the reshape gives the result a row-major layout (a transpose's own is
    column-major, which also sends it to float32). Other backends: as float32."""
    if dtype != jnp.bfloat16 or target_platform() != "cpu":
        return jax.lax.optimization_barrier(a.T) if barrier else a.T
    a_t = jax.lax.optimization_barrier(a).T
    return jax.lax.optimization_barrier(a_t.reshape(1, *a_t.shape))[0]


def _xla_forward(x, injection, weights, eps):
    L, B, D = x.shape
    dtype = x.dtype
    w = {k: v.astype(dtype) for k, v in weights.items()}  # as the reference casts them
    Ft, F = w["token_down"].shape[0], w["down"].shape[0]
    h0 = (x if injection is None else x + injection).reshape(L, B * D)
    # Mixing over L: a SwiGLU on the columns of h0, a residual, an RMSNorm over L. What
    # feeds only elementwise math (the SwiGLU halves, the pre-norm sums) stays float32.
    gate_up_t, down_t = _t(w["token_gate_up"], dtype, True), _t(w["token_down"], dtype, True)
    gate = dot(gate_up_t[:Ft], h0)  # (Ft, B*D)
    up = dot(gate_up_t[Ft:], h0)
    act = glu(gate, up).astype(dtype)  # float32 math, rounded once
    s1 = h0 + dot(down_t, act)  # (L, B*D)
    scale1 = rms_scale(s1, 0, eps)
    h1 = (s1 * scale1).astype(dtype).reshape(L * B, D)
    # Mixing over D: a SwiGLU on the rows of h1, a residual, an RMSNorm over D.
    gate2, up2 = dot(h1, w["gate_up"][:, :F]), dot(h1, w["gate_up"][:, F:])
    act2 = glu(gate2, up2).astype(dtype)  # (L*B, F)
    s2 = h1 + dot(act2, w["down"])  # (L*B, D)
    scale2 = rms_scale(s2, -1, eps)
    out = (s2 * scale2).astype(dtype).reshape(L, B, D)
    saved = (h0, gate, up, act, s1, scale1, h1, gate2, up2, act2, s2, scale2)
    # Zero-size slices of x and the injection: their types (dtype, the mesh axes they vary
    # over) for the input cotangents, at no cost in memory.
    inputs_like = (x[:0], None if injection is None else injection[:0])
    return out, (saved, weights, inputs_like)


def _xla_backward(eps, residuals, d_out):
    saved, weights, (x_like, injection_like) = residuals
    h0, gate, up, act, s1, scale1, h1, gate2, up2, act2, s2, scale2 = saved
    L, B, D = d_out.shape
    dtype = d_out.dtype
    w = {k: v.astype(dtype) for k, v in weights.items()}
    F = w["down"].shape[0]
    # Mixing over D, backwards. Gradients are float32 but for matmul operands (`dtype`).
    d_s2 = _rms_norm_grad(d_out.reshape(L * B, D), s2, scale2, -1)
    d_s2_lo = d_s2.astype(dtype)
    d_gate2, d_up2 = _silu_glu_grad(dot(d_s2_lo, _t(w["down"], dtype)), gate2, up2)
    d_gate2, d_up2 = d_gate2.astype(dtype), d_up2.astype(dtype)  # (L*B, F) each
    # Two matmuls per product, not one on [d_gate2 | d_up2]: XLA:CPU did not fuse that
    # concatenation along the last axis into the pass that makes its halves (the step was
    # 1% faster without it, within noise).
    w_gate_t, w_up_t = _t(w["gate_up"][:, :F], dtype), _t(w["gate_up"][:, F:], dtype)
    d_h1 = d_s2 + dot(d_gate2, w_gate_t) + dot(d_up2, w_up_t)
    h1_t = _t(h1, dtype)
    grads = {
        "down": _t(dot(_t(d_s2_lo, dtype), act2), dtype),
        "gate_up": jnp.concatenate([dot(h1_t, d_gate2), dot(h1_t, d_up2)], -1),
    }
    # Mixing over L, backwards.
    d_s1 = _rms_norm_grad(d_h1.reshape(L, B * D), s1, scale1, 0)
    d_s1_lo = d_s1.astype(dtype)
    d_gate, d_up = _silu_glu_grad(dot(w["token_down"], d_s1_lo), gate, up)
    d_gate_up = jnp.concatenate([d_gate, d_up], 0).astype(dtype)  # (2Ft, B*D)
    d_h0 = d_s1 + dot(w["token_gate_up"], d_gate_up)
    grads["token_down"] = dot(act, _t(d_s1_lo, dtype))
    grads["token_gate_up"] = _t(dot(d_gate_up, _t(h0, dtype)), dtype)
    d_h0 = d_h0.reshape(L, B, D)
    d_inj = None if injection_like is None else _cotangent_like(d_h0, injection_like)
    grads = {k: _cotangent_like(v, weights[k]) for k, v in grads.items()}
    return _cotangent_like(d_h0, x_like), d_inj, grads


def _cotangent_like(grad, primal):
    """grad in primal's dtype; under shard_map, summed over the mesh axes along which it
    varies and primal does not (e.g. replicated weights, whose per-device gradients are
    not): what autodiff does for the implicit broadcast of a replicated input."""
    extra = tuple(jax.typeof(grad).mat.varying - jax.typeof(primal).mat.varying)
    return (jax.lax.psum(grad, extra) if extra else grad).astype(primal.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_block(x, injection, weights, eps):
    return _xla_forward(x, injection, weights, eps)[0]


_xla_block.defvjp(_xla_forward, _xla_backward)


def mixer_step_xla(x_LxBxD, weights, injection_LxBxD=None, *, eps=1e-5):
    """`mixer_step_ref` on sequence-major activations, with a hand-written backward.

    Args:
      x_LxBxD: activations, (L, B, D), float32 or bfloat16 (the output has the same dtype).
      weights: as for `mixer_step`.
      injection_LxBxD: optional; added to x first.
      eps: RMSNorm epsilon.
    Returns:
      (L, B, D): `mixer_step_ref(x.swapaxes(0, 1), ...).swapaxes(0, 1)`, up to rounding.
    """
    batch_major = [None if a is None else a.swapaxes(0, 1) for a in (x_LxBxD, injection_LxBxD)]
    check_shapes(batch_major[0], weights, batch_major[1])
    return _xla_block(x_LxBxD, injection_LxBxD, weights, eps)
