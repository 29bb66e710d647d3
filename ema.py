"""Averages of the trained weights, used for evaluation.

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
