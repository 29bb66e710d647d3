"""Test setup: 8 fake CPU devices for data-parallel tests, strict rank promotion.

CI runs with JAX_PLATFORMS=cpu; nothing here forces the platform.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
