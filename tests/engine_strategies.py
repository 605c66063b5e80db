"""Values, leaf tensors and hypothesis settings shared by the engine tests.

    from engine_strategies import SETTINGS, SEEDS, SHAPES, leaf, normal, to_np

(tests/ has no __init__.py, so pytest puts it on sys.path and this imports as a
top-level module.) Value generators take a seed and a shape and return float64
NumPy arrays; the same seed gives the same values everywhere. A seed may also be
a ``numpy.random.Generator``, which draws on from where it is.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.extra import numpy as hnp

import tinytensor as tt

# -- hypothesis --------------------------------------------------------------------------------
# TT_GRADCHECK_EXAMPLES=500 for a long soak; the default keeps a file well under a minute
SETTINGS = settings(max_examples=int(os.environ.get("TT_GRADCHECK_EXAMPLES", 20)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
NONEMPTY = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
BROADCAST2 = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=0, max_side=4)
BROADCAST3 = hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=4, min_side=0, max_side=3)


# -- values (float64 arrays), kept away from an op's kinks where asked ------------------------------
def normal(seed, shape, scale=1.0):
    values = np.random.default_rng(seed).standard_normal(shape)
    values *= scale  # in place: a 0-d array stays an array (values * scale would be a NumPy scalar)
    return values


def positive(seed, shape, low=0.5):
    """At least ``low``: inputs for log, sqrt and fractional powers."""
    return low + np.abs(normal(seed, shape))


def away_from_zero(seed, shape, gap=0.2):
    """At least ``gap`` from 0 on either side: inputs for relu and negative integer powers."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=shape) * (gap + np.abs(rng.standard_normal(shape)))


def distinct(seed, shape):
    """Values with no ties (a scaled random permutation plus jitter), so max has no kinks nearby."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    return ((rng.permutation(n) - n / 2) * 0.5 + rng.uniform(-0.1, 0.1, n)).reshape(shape)


# -- tensors -------------------------------------------------------------------------------------
def leaf(backend_name, *shape, seed=0, dtype=np.float64):
    """A standard-normal tensor of ``shape`` that requires grad, on ``backend_name``."""
    return tt.tensor(normal(seed, shape).astype(dtype), requires_grad=True, backend=backend_name)


def to_np(array):
    """A backend array (a gradient, a tensor's data) as a NumPy array."""
    return tt.backend.to_numpy(array)
