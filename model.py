"""Tiny Recursive Model (TRM, arXiv:2510.04871) as pure functions over a params pytree.

One tiny network `net` (`layers` post-norm blocks) is applied over and over to two latent
states: the answer y and the reasoning state z. One supervision step ("ACT step") runs
`deep_recursion`: T-1 cycles of `latent_recursion` without gradient and one with, where a
cycle is n updates z <- net(z + y + x) followed by one update y <- net(y + z). The answer
head reads y; the Q head reads y at position 0 and decides when to stop.

Notable features:
- MLP-mixer variant (`mlp_t`: a SwiGLU over the sequence axis instead of attention, the
  paper's best Sudoku model) and the attention variant (RoPE / learned / no positions).
  The mixer block is `kernels.mixer_step_xla` (the jnp reference `kernels.mixer_step_ref`
  on sequence-major activations, with a hand-written backward), or `kernels.mixer_step`,
  the same block fused into one Pallas kernel (`Config.kernel`).
- Faithful to the official PyTorch code (SamsungSAILMontreal/TinyRecursiveModels @ e7b6871):
  same inits, widths, norms, puzzle-embedding prefix and loss; tests/test_model.py checks
  logits, losses and every gradient against arrays produced by that code.
- The halting rule, the refill of halted rows with new data and the loss are small named
  functions (`refill`, `act_step`, `loss_fn`), not hidden in a wrapper class.

Names: y = the reference's z_H, z = z_L, T = H_cycles, n = L_cycles, N_sup = halt_max_steps.
Shapes: B batch, S cells, P puzzle-embedding prefix, L = P + S, D width, V vocabulary.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

import kernels

IGNORE_LABEL = -100  # label of cells that count neither in the loss nor in accuracy
SWIGLU_MULTIPLE = 256  # SwiGLU width is rounded up to a multiple of this, as in the reference
Q_INIT_BIAS = -5.0  # sigmoid(-5) = 0.007: the Q head starts out (almost) never halting
TRUNC_STD = 0.87962566  # std of a standard normal truncated to [-2, 2]; divided out at init
STABLEMAX_EPS = 1e-30  # the reference's epsilon in s(x) = 1 / (1 - x + eps) for x < 0
BUFFERS = ("H_init", "L_init")  # fixed random start states: in params, never trained
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The reference's arch keys (config/arch/trm.yaml) -> our Config fields. train.py's flags
# carry the same names (--hidden_size sets D); FLAG_KEYS adds the flags of ours that set one.
REFERENCE_KEYS = {
    "hidden_size": "D",
    "num_heads": "heads",
    "expansion": "expansion",
    "H_cycles": "T",
    "L_cycles": "n",
    "L_layers": "layers",
    "mlp_t": "mlp_t",
    "pos_encodings": "pos_encodings",
    "puzzle_emb_ndim": "puzzle_emb_ndim",
    "puzzle_emb_len": "puzzle_emb_len",
    "halt_max_steps": "N_sup",
    "halt_exploration_prob": "halt_exploration_prob",
    "vocab_size": "vocab_size",
    "seq_len": "seq_len",
    "num_puzzle_identifiers": "num_puzzle_identifiers",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "forward_dtype": "forward_dtype",
    "no_ACT_continue": "no_ACT_continue",
}
FLAG_KEYS = REFERENCE_KEYS | {
    "loss_type": "loss_type",
    "halt_step_penalty": "halt_step_penalty",
    "kernel": "kernel",
    "interpret": "interpret",
}
# Reference keys that carry no model information (H_layers is ignored by its trm.py too).
REFERENCE_IGNORED = ("name", "H_layers", "batch_size", "causal")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 11  # V: PAD 0, blank 1, digits 2..10 for Sudoku
    seq_len: int = 81  # S: cells per puzzle
    D: int = 512  # width (hidden_size)
    heads: int = 8  # attention heads (attention variant only)
    expansion: float = 4.0  # SwiGLU expansion before rounding (see swiglu_width)
    T: int = 3  # outer cycles per supervision step (H_cycles); T-1 run without gradient
    n: int = 6  # z updates per cycle (L_cycles)
    layers: int = 2  # blocks in the one shared network (L_layers)
    N_sup: int = 16  # max supervision (ACT) steps (halt_max_steps)
    halt_exploration_prob: float = 0.1  # chance a row must run a random min number of steps
    mlp_t: bool = True  # MLP-mixer over the sequence instead of attention
    pos_encodings: str = "none"  # rope | learned | none
    puzzle_emb_ndim: int = 512  # width of the per-puzzle embedding, 0 = none
    puzzle_emb_len: int = 16  # prefix positions it fills (0 = ceil(ndim / D))
    num_puzzle_identifiers: int = 1  # rows of the puzzle-embedding table
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    forward_dtype: str = "bfloat16"  # activations and carry; params stay float32
    no_ACT_continue: bool = True  # halt on sigmoid(q_halt) alone; False adds the Q-continue loss
    loss_type: str = "stablemax"  # stablemax (the reference's) | softmax
    kernel: str = "xla"  # MLP-mixer block: xla (jnp) | pallas (kernels.mixer_step, fused)
    interpret: bool = False  # run the Pallas kernel in the interpreter (CPU tests)
    halt_step_penalty: float = 0.0  # lambda: cost of one more supervision step (Q-continue)

    def __post_init__(self):
        checks = [
            (self.pos_encodings in ("rope", "learned", "none"), "pos_encodings"),
            (self.forward_dtype in DTYPES, "forward_dtype"),
            (self.loss_type in ("stablemax", "softmax"), "loss_type"),
            (self.kernel in ("xla", "pallas"), "kernel"),
            (self.mlp_t or self.kernel == "xla", "the Pallas kernel is for mlp_t only"),
            (min(self.T, self.n, self.layers, self.N_sup, self.D, self.seq_len) >= 1, "T/n/..."),
            (self.mlp_t or self.D % self.heads == 0, "D % heads"),
            (self.puzzle_emb_ndim <= self.P * self.D, "puzzle_emb_ndim > P * D"),
            (0.0 <= self.halt_exploration_prob <= 1.0, "halt_exploration_prob"),
            (0.0 <= self.halt_step_penalty < 1.0, "halt_step_penalty in [0, 1)"),
            (
                self.halt_step_penalty == 0 or not self.no_ACT_continue,
                "halt_step_penalty prices continuing: it needs no_ACT_continue=False",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"Invalid Config ({what}): {self}")

    @property
    def P(self) -> int:  # puzzle-embedding prefix; none without a puzzle embedding
        if self.puzzle_emb_ndim == 0:
            return 0
        return self.puzzle_emb_len or -(-self.puzzle_emb_ndim // self.D)

    @property
    def L(self) -> int:  # positions the network sees
        return self.P + self.seq_len

    @property
    def dtype(self):
        return DTYPES[self.forward_dtype]

    @property
    def seq_major(self) -> bool:  # the recursion runs on (L, B, D) (kernels.mixer_step_xla)
        return self.mlp_t and self.kernel == "xla"

    @classmethod
    def from_flags(cls, values: dict, **overrides) -> "Config":
        """Config from {name: value} in the names of train.py's flags (FLAG_KEYS); fields it
        leaves out keep their defaults, which are the flags' defaults. A puzzle_emb_ndim of
        None is the width D, as the flag's help says."""
        kwargs = {FLAG_KEYS[k]: v for k, v in values.items() if k in FLAG_KEYS} | overrides
        if "puzzle_emb_ndim" in kwargs and kwargs["puzzle_emb_ndim"] is None:
            kwargs["puzzle_emb_ndim"] = kwargs.get("D", cls.D)
        return cls(**kwargs)

    @classmethod
    def from_reference(cls, arch: dict, **overrides) -> "Config":
        """Config from the reference's arch dict (or a whole all_config.yaml dict)."""
        arch = dict(arch.get("arch", arch))
        loss = arch.pop("loss", None) or {}
        if loss.get("loss_type"):
            overrides = {"loss_type": loss["loss_type"].removesuffix("_cross_entropy")} | overrides
        unknown = sorted(k for k in arch if k not in REFERENCE_KEYS and k not in REFERENCE_IGNORED)
        if unknown:
            raise ValueError(
                f"Unknown reference arch keys {unknown}; known: {list(REFERENCE_KEYS)}"
            )
        return cls.from_flags({k: v for k, v in arch.items() if k in REFERENCE_KEYS}, **overrides)


def swiglu_width(width: int, expansion: float) -> int:
    """Hidden width of a SwiGLU over `width` features, rounded as the reference rounds it."""
    return -(-round(expansion * width * 2 / 3) // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE


# ----------------------------------------------------------------------------- params


def init_params(key, cfg: Config) -> dict:
    """Params pytree with the reference's initialisation; matrices are (in, out)."""
    keys = iter(jax.random.split(key, 5 + 4 * cfg.layers))

    def normal(shape, std):  # truncated to +-2 std, rescaled so the std is exactly `std`
        return jax.random.truncated_normal(next(keys), -2.0, 2.0, shape) * (std / TRUNC_STD)

    def lecun(fan_in, fan_out):  # every linear layer: std 1/sqrt(fan_in), no bias
        return normal((fan_in, fan_out), fan_in**-0.5)

    def block():
        f, f_t = swiglu_width(cfg.D, cfg.expansion), swiglu_width(cfg.L, cfg.expansion)
        if cfg.mlp_t:  # token mixing: a SwiGLU along the L axis, shared by all channels
            mix = {"token_gate_up": lecun(cfg.L, 2 * f_t), "token_down": lecun(f_t, cfg.L)}
        else:  # fused q, k, v projection; heads * head_dim = D
            mix = {"qkv": lecun(cfg.D, 3 * cfg.D), "out": lecun(cfg.D, cfg.D)}
        return {**mix, "gate_up": lecun(cfg.D, 2 * f), "down": lecun(f, cfg.D)}

    params = {
        "embed": normal((cfg.vocab_size, cfg.D), cfg.D**-0.5),  # x sqrt(D) at use: unit scale
        "blocks": [block() for _ in range(cfg.layers)],
        "lm_head": lecun(cfg.D, cfg.vocab_size),
        # Zero weights and bias -5: q starts at -5 for every input, halting is learned later.
        "q_head": {"w": jnp.zeros((cfg.D, 2)), "b": jnp.full((2,), Q_INIT_BIAS, jnp.float32)},
        "H_init": normal((cfg.D,), 1.0),
        "L_init": normal((cfg.D,), 1.0),
    }
    if cfg.pos_encodings == "learned":
        params["pos"] = normal((cfg.L, cfg.D), cfg.D**-0.5)
    if cfg.puzzle_emb_ndim:  # zero init: puzzles start out indistinguishable
        params["puzzle_emb"] = jnp.zeros((cfg.num_puzzle_identifiers, cfg.puzzle_emb_ndim))
    return params


def num_params(params) -> int:
    """Trained weights, counted as the reference counts them (no buffers, no puzzle table)."""
    counted = {k: v for k, v in params.items() if k not in (*BUFFERS, "puzzle_emb")}
    return sum(x.size for x in jax.tree.leaves(counted))


# ----------------------------------------------------------------------------- the network


def rope_tables(cfg: Config):
    """Non-interleaved ("rotate half") RoPE cos/sin tables, (L, head_dim) each, float32."""
    head_dim = cfg.D // cfg.heads
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs_LxH = jnp.outer(jnp.arange(cfg.L, dtype=jnp.float32), inv_freq)
    angles = jnp.concatenate([freqs_LxH, freqs_LxH], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxK, cos_LxK, sin_LxK):
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_LxK[None, :, None], sin_LxK[None, :, None]
    return (x * cos + rotated * sin).astype(x_BxLxHxK.dtype)


def attention(w, cfg: Config, h_BxLxD, rope):
    """Non-causal multi-head self-attention, no bias, scale 1/sqrt(head_dim)."""
    B, L, D = h_BxLxD.shape
    qkv = (h_BxLxD @ w["qkv"].astype(h_BxLxD.dtype)).reshape(B, L, 3 * cfg.heads, -1)
    q, k, v = jnp.split(qkv, 3, axis=2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = jnp.einsum("bqhk,bphk->bhqp", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores / math.sqrt(D // cfg.heads), axis=-1).astype(v.dtype)
    out_BxLxD = jnp.einsum("bhqp,bphk->bqhk", probs, v).reshape(B, L, D)
    return out_BxLxD @ w["out"].astype(h_BxLxD.dtype)


def block(w, cfg: Config, h, injection, rope):
    """One post-norm block on h (+ the injection, when given):
        h <- RMSNorm(h + mix(h)), then h <- RMSNorm(h + SwiGLU(h)) over the channels,
    where mix is attention, or with mlp_t a SwiGLU over the sequence (the MLP-mixer block:
    kernels.mixer_step_ref in the (B, L, D) layout, run by the fused Pallas kernel or the
    XLA path). h and the injection are in `recursion_layout`: (L, B, D) on the XLA mixer
    path, else (B, L, D)."""
    if cfg.mlp_t:
        if cfg.kernel == "pallas":
            eps, interpret = cfg.rms_norm_eps, cfg.interpret
            return kernels.mixer_step(h, w, injection, eps=eps, interpret=interpret)
        return kernels.mixer_step_xla(h, w, injection, eps=cfg.rms_norm_eps)
    h_BxLxD = h if injection is None else h + injection
    h_BxLxD = kernels.rms_norm(h_BxLxD + attention(w, cfg, h_BxLxD, rope), cfg.rms_norm_eps)
    mlp = kernels.swiglu(h_BxLxD, w["gate_up"], w["down"])
    return kernels.rms_norm(h_BxLxD + mlp, cfg.rms_norm_eps)


def net(params, cfg: Config, h, injection, rope):
    """The one tiny network: the injection is added once (by the first block), then
    `layers` blocks."""
    for i, w in enumerate(params["blocks"]):
        h = block(w, cfg, h, injection if i == 0 else None, rope)
    return h


def recursion_layout(cfg: Config, *arrays):
    """(B, L, D) arrays in the layout the recursion runs on, and back: with `cfg.seq_major`
    (the XLA mixer path) that is (L, B, D), so that no block transposes its activations;
    otherwise they are returned as they are."""
    return tuple(a.swapaxes(0, 1) for a in arrays) if cfg.seq_major else arrays


def latent_recursion(params, cfg: Config, x, y, z, rope, unroll=1):
    """Paper: n times z <- net(x, y, z), then y <- net(y, z). x is not injected into y.
    x, y, z (and the results) are in `recursion_layout`. `unroll` as for `fori_loop`."""
    y_plus_x = y + x
    z = jax.lax.fori_loop(
        0, cfg.n, lambda _, z: net(params, cfg, z, y_plus_x, rope), z, unroll=unroll
    )
    y = net(params, cfg, y, z, rope)
    return y, z


def deep_recursion(params, cfg: Config, x, y, z, rope):
    """Paper: T-1 latent recursions without gradient, then one with gradient."""
    # No gradient: run on stopped params, x, y and z, so autodiff never sees this loop and
    # keeps no activations for it (only 1 of the T cycles, (n+1) * layers blocks, is recorded).
    params_ng, x_ng, yz = jax.lax.stop_gradient((params, x, (y, z)))
    y, z = jax.lax.fori_loop(
        0, cfg.T - 1, lambda _, yz: latent_recursion(params_ng, cfg, x_ng, *yz, rope), yz
    )
    # With gradient: unrolled, so each block's saved activations are buffers of their own
    # rather than slices of stacked loop outputs that XLA writes and reads with extra copies
    # (docs/PERFORMANCE.md).
    return latent_recursion(params, cfg, x, y, z, rope, unroll=True)


def embed_input(params, cfg: Config, inputs_BxS, puzzle_ids_B):
    """x: token embeddings behind a P-position puzzle-embedding prefix, scaled by sqrt(D).

    Computed in float32 from the float32 tables and cast once at the end: the gradient of a
    table row adds up every position that looked it up (thousands per token row in a batch,
    the whole batch for a learned position), and that sum stays in float32 whatever the
    forward dtype."""
    x_BxLxD = params["embed"][inputs_BxS]
    if cfg.P:  # the puzzle vector, zero-padded to P * D values, fills the prefix positions
        B = inputs_BxS.shape[0]
        p = params["puzzle_emb"][puzzle_ids_B]
        p_BxPxD = jnp.pad(p, ((0, 0), (0, cfg.P * cfg.D - cfg.puzzle_emb_ndim)))
        x_BxLxD = jnp.concatenate([p_BxPxD.reshape(B, cfg.P, cfg.D), x_BxLxD], axis=1)
    if cfg.pos_encodings == "learned":  # 1/sqrt(2) keeps the sum at the same scale
        x_BxLxD = (x_BxLxD + params["pos"][None]) * (1 / math.sqrt(2))
    return (x_BxLxD * math.sqrt(cfg.D)).astype(cfg.dtype)


def recurse(params, cfg: Config, y, z, data):
    """One supervision step of the model on the rows' data: new (y, z), logits, q logits."""
    rope = rope_tables(cfg) if cfg.pos_encodings == "rope" and not cfg.mlp_t else None
    x = embed_input(params, cfg, data["inputs"], data["puzzle_identifiers"])
    y, z = recursion_layout(
        cfg, *deep_recursion(params, cfg, *recursion_layout(cfg, x, y, z), rope)
    )
    logits_BxSxV = y[:, cfg.P :] @ params["lm_head"].astype(cfg.dtype)  # the head reads y
    # The bias is added in float32, so its gradient (a sum over the batch) is float32 too.
    q = (y[:, 0] @ params["q_head"]["w"].astype(cfg.dtype)).astype(jnp.float32)
    q_halt, q_continue = (q + params["q_head"]["b"][None]).T
    # The carry is detached: no gradient flows from one supervision step into the next.
    return jax.lax.stop_gradient((y, z)), logits_BxSxV, q_halt, q_continue


# ----------------------------------------------------------------------------- ACT


def initial_carry(cfg: Config, batch):
    """All rows halted, so the first `act_step` fills every row with new data."""
    B = batch["inputs"].shape[0]
    return {
        "y": jnp.zeros((B, cfg.L, cfg.D), cfg.dtype),
        "z": jnp.zeros((B, cfg.L, cfg.D), cfg.dtype),
        "steps": jnp.zeros((B,), jnp.int32),
        "halted": jnp.ones((B,), bool),
        "data": jax.tree.map(jnp.zeros_like, batch),
    }


def refill(params, cfg: Config, carry, batch):
    """Halted rows restart from (H_init, L_init) at step 0 on the new batch's row.

    Rows still running keep their state and data; the new batch's rows at those positions
    are not used (the reference does the same).
    """
    halted_B = carry["halted"]

    def pick(new, old):
        return jnp.where(halted_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return {
        "y": pick(params["H_init"].astype(cfg.dtype)[None, None], carry["y"]),
        "z": pick(params["L_init"].astype(cfg.dtype)[None, None], carry["z"]),
        "steps": jnp.where(halted_B, 0, carry["steps"]),
        "halted": halted_B,
        "data": jax.tree.map(pick, batch, carry["data"]),
    }


def exploration_min_steps(key, cfg: Config, batch_size, prob=None):
    """Per row, the fewest steps it must run before it may halt: with probability `prob`
    (default halt_exploration_prob; may be traced, e.g. annealed) a uniform draw from
    [2, N_sup], otherwise 0 (no constraint).

    Drawn for the global batch outside the model, so training is the same whatever the
    number of devices the batch is split over.
    """
    prob = cfg.halt_exploration_prob if prob is None else prob
    k_explore, k_steps = jax.random.split(key)
    explore = jax.random.uniform(k_explore, (batch_size,)) < prob
    return jnp.where(explore, jax.random.randint(k_steps, (batch_size,), 2, cfg.N_sup + 1), 0)


def act_step(params, cfg: Config, carry, batch, train=False, min_steps=None, perturb=None):
    """One supervision step: refill halted rows, recurse, decide which rows halt.

    Training halts a row when q_halt > 0 (or > q_continue) once it has run min_steps
    (see exploration_min_steps); evaluation runs every row exactly N_sup steps.
    perturb: (y, z, steps) -> (y, z), applied to the states the deep recursion starts from
    (test-time noise; `steps` is each row's count of finished steps).
    """
    carry = refill(params, cfg, carry, batch)
    y, z = carry["y"], carry["z"]
    if perturb is not None:
        y, z = perturb(y, z, carry["steps"])
    (y, z), logits, q_halt, q_continue = recurse(params, cfg, y, z, carry["data"])
    outputs = {"logits": logits, "q_halt": q_halt, "q_continue": q_continue}
    steps = carry["steps"] + 1
    is_last = steps >= cfg.N_sup
    halted = is_last
    if train and cfg.N_sup > 1:
        halted = halted | (q_halt > (0 if cfg.no_ACT_continue else q_continue))
        if min_steps is not None:
            halted = halted & (steps >= min_steps)
        if not cfg.no_ACT_continue:  # Q-learning target from one more step, no gradient
            _, _, next_halt, next_continue = recurse(
                jax.lax.stop_gradient(params), cfg, y, z, carry["data"]
            )
            next_q = jnp.where(is_last, next_halt, jnp.maximum(next_halt, next_continue))
            # Compute-aware halting: one more step costs halt_step_penalty (lambda) of value,
            # so continuing must promise that much more chance of being right than halting.
            target = jax.nn.sigmoid(next_q) - cfg.halt_step_penalty
            outputs["q_continue_target"] = jnp.maximum(target, 0.0)
    carry = {"y": y, "z": z, "steps": steps, "halted": halted, "data": carry["data"]}
    return carry, outputs


# ----------------------------------------------------------------------------- loss


def log_stablemax(x, axis=-1):
    """log of stablemax: s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0, normalised."""
    s = jnp.where(x < 0, 1 / (1 - jnp.minimum(x, 0) + STABLEMAX_EPS), x + 1)  # min: no inf grad
    return jnp.log(s / jnp.sum(s, axis, keepdims=True))


def cross_entropy(logits_BxSxV, labels_BxS, loss_type):
    """Per-token cross-entropy in float32; 0 where the label is IGNORE_LABEL."""
    logits = logits_BxSxV.astype(jnp.float32)
    logp = log_stablemax(logits) if loss_type == "stablemax" else jax.nn.log_softmax(logits)
    valid = labels_BxS != IGNORE_LABEL
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels_BxS, 0)[..., None], -1)[..., 0]
    return -jnp.where(valid, picked, 0.0)


def bce_with_logits(logits, targets):
    return jax.nn.softplus(logits) - logits * targets


def loss_fn(
    params,
    cfg: Config,
    carry,
    batch,
    min_steps=None,
    *,
    train=True,
    global_batch_size,
    counted=None,
    perturb=None,
):
    """One ACT step and its loss; returns (loss, (carry, metric sums, outputs)).

    loss = [sum over rows of the mean token CE of the row + 0.5 * (q-halt BCE + q-continue
    BCE)] / global_batch_size. The q-halt target is whether the row's current argmax answer
    is entirely right. Metrics are sums over the rows with labels that halted this step (count
    is their number), as the reference reports them; divide by count (or the batch) to get
    means. `counted` (bool per row; evaluation leaves out padding rows and noisy
    trajectories) restricts the loss and metrics to those rows; `perturb` is act_step's.
    """
    carry, out = act_step(params, cfg, carry, batch, train, min_steps, perturb)
    labels = carry["data"]["labels"]  # the labels of the rows actually processed
    mask = labels != IGNORE_LABEL
    counts = mask.sum(-1)
    divisor = jnp.maximum(counts, 1)
    correct = mask & (jnp.argmax(out["logits"], -1) == labels)
    seq_correct = correct.sum(-1) == counts

    counted = jnp.ones_like(seq_correct) if counted is None else counted
    ce = cross_entropy(out["logits"], labels, cfg.loss_type).sum(-1) / divisor
    lm_loss = jnp.sum(jnp.where(counted, ce, 0))
    q_halt_loss = jnp.sum(jnp.where(counted, bce_with_logits(out["q_halt"], seq_correct), 0))
    q_continue_loss = 0.0
    if "q_continue_target" in out:
        bce = bce_with_logits(out["q_continue"], out["q_continue_target"])
        q_continue_loss = jnp.sum(jnp.where(counted, bce, 0))
    loss = (lm_loss + 0.5 * (q_halt_loss + q_continue_loss)) / global_batch_size

    valid = carry["halted"] & (counts > 0) & counted
    metrics = {
        "count": valid.sum(),
        "accuracy": jnp.sum(jnp.where(valid, correct.sum(-1) / divisor, 0.0)),
        "exact_accuracy": jnp.sum(valid & seq_correct),
        "q_halt_accuracy": jnp.sum(valid & ((out["q_halt"] >= 0) == seq_correct)),
        "steps": jnp.sum(jnp.where(valid, carry["steps"], 0)),
        "lm_loss": lm_loss,
        "q_halt_loss": q_halt_loss,
        "q_continue_loss": jnp.asarray(q_continue_loss, jnp.float32),
    }
    out["seq_correct"] = seq_correct
    return loss, (carry, jax.tree.map(jax.lax.stop_gradient, metrics), out)


# ----------------------------------------------------------------------------- cost


def block_flops(cfg: Config) -> int:
    """Matmul FLOPs of one block application on one example (see flops_per_example)."""
    L, D, F = cfg.L, cfg.D, swiglu_width(cfg.D, cfg.expansion)
    if cfg.mlp_t:
        return 6 * L * D * (swiglu_width(L, cfg.expansion) + F)
    return 8 * L * D * D + 4 * L * L * D + 6 * L * D * F


def flops_per_example(cfg: Config, train_step: bool = True) -> int:
    """Matmul FLOPs per example of one train step (one ACT step, forward and backward) or of
    a whole evaluation (N_sup ACT steps, forward only). For L = P + S positions, width D,
    SwiGLU widths F = swiglu_width(D) and Ft = swiglu_width(L), vocabulary V:

      MLP-mixer block    6*L*D*(Ft + F)     token mixing 2*D*L*3Ft, channel MLP 2*L*D*3F
      attention block    8*L*D*D + 4*L*L*D + 6*L*D*F
      heads              2*S*D*V + 4*D      lm head on the S cells, q head on position 0
      train step         layers*(n+1)*(T+2)*block + 3*heads: T cycles forward, of which the
                         last is differentiated (its backward costs two more forwards)
      evaluation         N_sup*(layers*(n+1)*T*block + heads)
    """
    heads = 2 * cfg.seq_len * cfg.D * cfg.vocab_size + 4 * cfg.D
    blocks = cfg.layers * (cfg.n + 1)
    if train_step:
        return blocks * (cfg.T + 2) * block_flops(cfg) + 3 * heads
    return cfg.N_sup * (blocks * cfg.T * block_flops(cfg) + heads)


# ----------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("cfg", "n_sup"))
def predict(params, cfg: Config, inputs, puzzle_identifiers=None, n_sup=None):
    """Evaluation-mode ACT loop: n_sup (default N_sup) steps from a fresh carry.

    inputs (B, S) int token ids; puzzle_identifiers (B,) (default 0, the blank id).
    Returns the final logits (B, S, V) and q-halt logits (B,).
    """
    if puzzle_identifiers is None:
        puzzle_identifiers = jnp.zeros(inputs.shape[:1], jnp.int32)
    batch = {
        "inputs": jnp.asarray(inputs, jnp.int32),
        "puzzle_identifiers": jnp.asarray(puzzle_identifiers, jnp.int32),
    }
    cfg = dataclasses.replace(cfg, N_sup=n_sup or cfg.N_sup)
    carry = initial_carry(cfg, batch)
    carry, out = act_step(params, cfg, carry, batch)  # the first step fills every row

    def step(_, c_out):
        return act_step(params, cfg, c_out[0], batch)

    carry, out = jax.lax.fori_loop(1, cfg.N_sup, step, (carry, out))
    return out["logits"], out["q_halt"]


# ----------------------------------------------------------------------------- evaluation


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


def eval_sums(params, cfg: Config, carry, batch, ttc=None, outputs=False):
    """N_sup evaluation steps on a batch of b puzzles, run as K trajectories each (the carry
    has K * b rows, trajectory-major; trajectory 0 unperturbed). Returns sums over the
    puzzles with labels (not padding rows): the final step's metrics of trajectory 0, where
    its Q head would halt (the first step it says halt, else N_sup) and whether it is exact
    there, and after each step the exact hits of trajectory 0 and of the answers the first
    k trajectories select for each k in ttc.trajectories (`select_trajectories`).

    outputs: also return trajectory 0's final answers per puzzle, {"preds": (b, S) token
    ids, "q_halt_logits": (b,)}, what the ARC evaluator votes with."""
    ttc = ttc or TestTimeCompute()
    b, K = batch["inputs"].shape[0], max(ttc.trajectories)
    has_labels = (batch["labels"] != IGNORE_LABEL).any(-1)  # not a padding row
    rows = jax.tree.map(lambda x: jnp.concatenate([x] * K), batch)
    first = (jnp.arange(K * b) < b) & jnp.concatenate([has_labels] * K)  # no padding
    perturb = trajectory_noise(cfg, ttc, rows["index"], b) if K > 1 and ttc.noise else None

    def one_step(c, _):
        carry, halt_at, exact_at, _ = c
        _, (carry, metrics, out) = loss_fn(
            params, cfg, carry, rows, train=False, global_batch_size=1, counted=first,
            perturb=perturb,
        )  # fmt: skip
        wants = out["q_halt"] > (0 if cfg.no_ACT_continue else out["q_continue"])
        now = (halt_at == 0) & (wants[:b] | (carry["steps"][:b] >= cfg.N_sup))
        halt_at = jnp.where(now, carry["steps"][:b], halt_at)
        exact_at = jnp.where(now, out["seq_correct"][:b], exact_at)
        chosen = select_trajectories(out, rows["labels"][:b], K, ttc.trajectories)
        hits = {k: jnp.sum(v & has_labels, -1) for k, v in chosen.items()}
        answers = {
            "preds": jnp.argmax(out["logits"][:b], -1).astype(jnp.int32),
            "q_halt_logits": out["q_halt"][:b],
        }
        return (carry, halt_at, exact_at, answers), (metrics, hits)

    answers = {  # zeros like the batch's rows (so, inside a shard_map, varying like them)
        "preds": jnp.zeros_like(batch["inputs"], jnp.int32),
        "q_halt_logits": jnp.zeros_like(batch["inputs"][:, 0], jnp.float32),
    }
    start = (
        carry,
        jnp.zeros_like(carry["steps"][:b]),
        jnp.zeros_like(carry["halted"][:b]),
        answers,
    )
    (_, halt_at, exact_at, answers), (metrics, hits) = jax.lax.scan(
        one_step, start, length=cfg.N_sup
    )
    adaptive = {
        "halted_exact_accuracy": jnp.sum(exact_at & has_labels),
        "halted_steps": jnp.sum(jnp.where(has_labels, halt_at, 0)),
    }
    sums = jax.tree.map(lambda m: m[-1], metrics) | adaptive | hits
    return (sums, answers) if outputs else sums


def eval_metrics(sums, cfg: Config = None, ttc: TestTimeCompute = None):
    """Test metrics from eval_sums' sums over the test set: means over the test examples of
    the final step's metrics, exact accuracy after each step, and for each of ttc.steps and
    trajectory count k (with cfg) the accuracies of the selected answers and the forward
    FLOPs they cost per puzzle."""
    sums = dict(sums)
    count = max(int(sums.pop("count")), 1)
    per_step = {k: sums.pop(k) for k in list(sums) if "@" in k}  # (N_sup,) hits each
    out = {k: float(v) / count for k, v in sums.items()} | {"count": count}
    for i, hits in enumerate(per_step["exact@1"]):
        out[f"exact_accuracy_step{i + 1}"] = float(hits) / count
    for S in ttc.steps if ttc else ():
        flops = flops_per_example(dataclasses.replace(cfg, N_sup=S), train_step=False)
        for name, hits in per_step.items():
            how, k = name.split("@")
            out[f"{how}_accuracy@steps={S},K={k}"] = float(hits[S - 1]) / count
            out[f"flops_per_puzzle@steps={S},K={k}"] = int(k) * flops
    return out


def trajectory_noise(cfg: Config, ttc: TestTimeCompute, index, b):
    """act_step's `perturb` for K * b trajectory-major rows of test examples `index` (-1:
    padding): trajectory 0 unchanged."""
    index = jnp.maximum(index, 0)
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
    mask = labels_BxS != IGNORE_LABEL
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
