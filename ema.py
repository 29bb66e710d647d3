"""How the trained weights move and are averaged: the optimisers' update rules that optax
does not have (AdamATan2, the puzzle table's row-sparse SignSGD) and the reference's learning
rate schedule, then the averages of the weights that evaluation uses.

EMA, as in the reference (models/ema.py): shadow <- rate * shadow + (1 - rate) * param after
every optimiser step, starting from the initial params, with no bias correction. It covers
the weights AdamATan2 trains, not the puzzle-embedding table nor the fixed buffers. The EMA
lives in the train state, so it is donated, sharded and checkpointed with the rest.

Running mean (SWA-style checkpoint averaging, `train.py --swa_start=S`): the uniform average
of the weights after every step from S on, mean_k = mean_{k-1} + (param - mean_{k-1}) / k.
`mean_of` averages finished checkpoints instead (`train.py --eval_only --average_checkpoints`).
"""

import jax
import jax.numpy as jnp
import optax

# ----------------------------------------------------------------------------- optimisers


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
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"count": jnp.zeros([], jnp.int32), "m": zeros, "v": zeros}

    def update(grads, state, params):
        t = state["count"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        step, sqrt_c2 = lr(t) / (1 - b1**t), jnp.sqrt(1 - b2**t)

        def one(p, m, v):
            return -lr(t) * weight_decay * p - step * jnp.arctan2(m, jnp.sqrt(v) / sqrt_c2)

        return jax.tree.map(one, params, m, v), {"count": t, "m": m, "v": v}

    return optax.GradientTransformation(init, update)


def sign_sgd_rows(lr, weight_decay) -> optax.GradientTransformationExtraArgs:
    """The puzzle table's optimiser: only the rows used by the batch (`rows`, a bool per
    row) move, by w <- w (1 - lr wd) - lr sign(g), as the reference's sparse SignSGD."""

    def init(params):
        return {"count": jnp.zeros([], jnp.int32)}

    def update(grads, state, params, *, rows, **_):
        t = state["count"] + 1

        def one(p, g):
            return jnp.where(rows[:, None], -lr(t) * (weight_decay * p + jnp.sign(g)), 0.0)

        return jax.tree.map(one, params, grads), {"count": t}

    return optax.GradientTransformationExtraArgs(init, update)


# ----------------------------------------------------------------------------- averages


def init(params):
    return jax.tree.map(lambda p: p.copy(), params)


def update(ema, params, rate):
    return jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, ema, params)


def running_mean_init(params):
    return {"count": jnp.zeros([], jnp.int32), "mean": jax.tree.map(jnp.zeros_like, params)}


def running_mean_update(avg, params, include):
    """Add `params` to the average where `include` (a traced bool) holds."""
    count = avg["count"] + include.astype(jnp.int32)
    weight = jnp.where(include, 1.0 / jnp.maximum(count, 1), 0.0)
    mean = jax.tree.map(lambda m, p: m + weight * (p - m), avg["mean"], params)
    return {"count": count, "mean": mean}


def mean_of(trees):
    """The element-wise mean of a list of equal pytrees (checkpoints' weights)."""
    return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
