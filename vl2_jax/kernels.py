"""Accelerator-specific kernels behind portable functions: each picks a fast kernel where it applies
and falls back to the plain JAX operation everywhere else (CPU, TPU, other GPUs, float32).

`ragged_dot`: on NVIDIA Hopper GPUs (compute capability 9.0) in bf16/f16 it runs the Pallas Mosaic
GPU grouped matmul that ships with JAX (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`); elsewhere
`jax.lax.ragged_dot`. On an H200 at a 1042-token prefill the Mosaic kernel took 0.15 ms for tiny's
expert gate/up projection where `lax.ragged_dot` took 2.3 ms (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

try:  # an example kernel module of JAX, not a stable API: any import failure means "not available"
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as _mgpu
except Exception:  # noqa: BLE001
    _mgpu = None

# Tile sizes: the fastest in a sweep on an H200 at tiny's and small's prefill shapes, even and skewed routing
# (`benchmarks/ragged_dot_tiles.py`; BENCHMARKS.md).
BLOCK_M, BLOCK_N, BLOCK_K, STEPS, GRID_BLOCK_N = 128, 128, 64, 4, 4
ROW_MULTIPLE = 8  # the Mosaic kernel's row count must be a multiple of its 8-row tiling


@functools.cache
def _hopper_gpu() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return getattr(jax.local_devices()[0], "compute_capability", None) == "9.0"


def mosaic_ragged_usable(dtype, k: int, n: int) -> bool:
    """Whether `ragged_dot` of [M, k] x [G, k, n] in `dtype` runs the Mosaic GPU kernel here."""
    return (
        _mgpu is not None
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and k % BLOCK_K == 0
        and n % BLOCK_N == 0
        and _hopper_gpu()
        and _mosaic_self_check()
    )


@functools.cache
def _mosaic_self_check() -> bool:
    """Runs the kernel once on a small problem against `lax.ragged_dot`: the kernel comes from JAX's
    examples, not a stable API, so a JAX whose version of it breaks or changes its signature gets a
    warning and the portable path instead of a failing prefill. Runs eagerly even inside a trace."""
    try:
        with jax.ensure_compile_time_eval():
            k1, k2 = jax.random.split(jax.random.key(0))
            lhs = jax.random.normal(k1, (2 * BLOCK_M, BLOCK_K), jnp.bfloat16)
            rhs = jax.random.normal(k2, (3, BLOCK_K, BLOCK_N), jnp.bfloat16)
            sizes = jnp.array([100, 0, 150], jnp.int32)  # 6 rows in no group
            got = _mosaic_ragged_dot(lhs, rhs, sizes)[:250].astype(jnp.float32)
            want = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)[:250]
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        if not err < 2e-2:
            raise ValueError(f"relative error {err:.3g} against lax.ragged_dot")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"vl2_jax: the Mosaic GPU grouped matmul failed its self-check ({type(e).__name__}: "
                      f"{str(e)[:200]}); prefill uses the slower portable dispatch instead.", stacklevel=2)
        return False


@jax.jit
def _mosaic_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G):
    # Its own jit, so that a model calling it per layer lowers the kernel once per shape, not per call.
    return _mgpu.ragged_dot(
        lhs_MK, rhs_GKN, group_sizes=group_sizes_G, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K,
        max_concurrent_steps=STEPS, grid_block_n=GRID_BLOCK_N,
    )


def ragged_dot(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """Grouped matmul: rows [M, K] in consecutive groups of `group_sizes` [G] times each group's matrix
    [G, K, N] -> [M, N] in the input dtype, accumulated in float32 (HIGHEST precision for float32).

    Rows past `sum(group_sizes)` belong to no group: their output is unspecified (the Mosaic kernel
    leaves them unwritten), so callers mask them. The kernel runs for M a multiple of `ROW_MULTIPLE` and
    at least one row tile (`BLOCK_M`; fewer rows were not tested on the GPU, and are decode sizes, where
    the kernel is no faster than the grouped dispatch).
    """
    m, k = lhs_MK.shape
    n = rhs_GKN.shape[-1]
    fits = m % ROW_MULTIPLE == 0 and m >= BLOCK_M and lhs_MK.dtype == rhs_GKN.dtype
    if fits and mosaic_ragged_usable(lhs_MK.dtype, k, n):
        return _mosaic_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)
    precision = jax.lax.Precision.HIGHEST if lhs_MK.dtype == jnp.float32 else None
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, precision=precision)
