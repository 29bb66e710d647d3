"""Exponential moving average of the trained weights, used for evaluation.

As in the reference (models/ema.py): shadow <- rate * shadow + (1 - rate) * param after
every optimiser step, starting from the initial params, with no bias correction. It covers
the weights AdamATan2 trains, not the puzzle-embedding table nor the fixed buffers. The EMA
lives in the train state, so it is donated, sharded and checkpointed with the rest.
"""

import jax


def init(params):
    return jax.tree.map(lambda p: p.copy(), params)


def update(ema, params, rate):
    return jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, ema, params)
