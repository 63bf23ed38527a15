"""Accelerator-specific kernels behind portable functions: each picks a fast kernel where it applies
and falls back to the plain JAX operation everywhere else (CPU, TPU, other GPUs, float32).

`ragged_dot`: on NVIDIA Hopper GPUs (compute capability 9.0) in bf16/f16 it runs the Pallas Mosaic
GPU grouped matmul that ships with JAX (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`); elsewhere
`jax.lax.ragged_dot`. On an H200 at a 1042-token prefill the Mosaic kernel took 0.15 ms for tiny's
expert gate/up projection where `lax.ragged_dot` took 2.3 ms (BENCHMARKS.md).

`gathered_matvec`: the decode step's chosen-expert matrix-vector products as one Pallas Triton kernel
that reads each chosen expert's weights in place. XLA's form of it (`w[ids]` then a dot) first copies
the chosen experts' weights out, which was a quarter of small's batch-1 decode step on an H200. The
portable form of the same product stays in `vl2_jax.modules.moe.outputs_gather`. JAX 0.11 marks
Pallas's Triton backend deprecated (a DeprecationWarning at lowering); a JAX without it, or on which
the kernel fails its self-check, runs XLA's gather again, until the kernel moves to Mosaic GPU.

`dense_matvec`: the same kernel for one row times a dense weight (batch-1 decode's attention
projections and shared experts), which XLA runs as a multiply and a reduction with the weight-sized
product written out in between (small's batch-1 decode on an H200: 263 -> 326 tok/s).

`expert_matmul`: the grouped dispatch's per-expert matmuls at decode batches, skipping the experts no
token chose, so a batch of 8 reads ~35 of small's 64 experts instead of all of them (small's batch-8
decode on an H200: 866 -> 2133 tok/s).

`blocked_matmul`: prefill's routed experts over quantized weights: blocks of expert-sorted rows, each
times its expert's int8/fp8 values read in place and dequantized in registers. JAX's Mosaic grouped
matmul takes one dtype, so quantized experts reached it only as a 16-bit copy of every expert's values
written at each prefill (small: 14.4G elements, ~43 GB of traffic per prompt).

`decode_attention`: one query token per row against that row's cached keys, read in place up to the
row's own length, with the softmax kept online over blocks of keys (the plain path reads every row up
to the call's key bucket, through a score tensor and a masked softmax).

`cudnn_attention_usable`: whether `jax.nn.dot_product_attention` may run cuDNN flash attention (the
vision tower and the language model's prefill use it; their plain softmax paths run elsewhere).

Which kernels may run is the caller's explicit choice (`vl2_jax.config.Runtime.kernels`): the `*_usable`
checks say only whether a kernel can run here, and the functions that pick a kernel take a `use_kernel`
argument. Nothing here reads the environment.
"""

from __future__ import annotations

import functools
import signal
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def _import_mosaic_example():
    """JAX's Mosaic GPU grouped matmul, an example kernel module of JAX, not a stable API (any import
    failure: None, "not available"). It imports JAX's test utilities, which install absl's failure
    signal handler: SIGTERM's is put back, so a stop stays the Python exit the commands make of it, with
    no stack dump."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception:  # noqa: BLE001
        return None
    finally:
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)
    return ragged_dot_mgpu


_mgpu = _import_mosaic_example()

try:  # Pallas's Triton backend, deprecated in JAX 0.11: once it is gone, decode uses XLA's gather
    from jax.experimental.pallas import triton as pl_triton
except Exception:  # noqa: BLE001
    pl_triton = None

# Tiles (block_m, block_n, block_k, max_concurrent_steps, grid_block_n) by the output width N. Where N
# is a multiple of 256 (every expert projection on one device): the fastest per call in a sweep on an
# H200 at small's prefill shapes, even and skewed routing (`benchmarks/tile_sweep.py --kernel ragged`),
# and faster end to end than NARROW_TILES: small's prefill 24.97 -> 24.27 ms, base's 38.55 -> 36.17 ms
# (BENCHMARKS.md). Where N is only a multiple of 128 (a tensor split of tiny's or small's expert
# width): NARROW_TILES, the fastest of the narrower sweeps.
WIDE_TILES, NARROW_TILES = (64, 256, 64, 4, 4), (128, 128, 64, 4, 4)
BLOCK_K = 64  # both tile sets' block_k: the contraction dim must be a multiple of it
ROW_MULTIPLE = 8  # the Mosaic kernel's row count must be a multiple of its 8-row tiling
MIN_ROWS = 128  # the fewest rows the kernel takes: fewer are decode sizes, where it is no faster


def local_arrays() -> bool:
    """Whether the arrays being traced are whole per-device arrays: on one device, or inside
    `shard_map` (every mesh axis manual). Kernels run only there: under automatic partitioning their
    operands would be gathered onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


@functools.cache
def _hopper_gpu() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return getattr(jax.local_devices()[0], "compute_capability", None) == "9.0"


def cudnn_attention_usable(dtype, head_dim: int) -> bool:
    """cuDNN flash attention's constraints: an NVIDIA GPU, 16-bit floats, head dim a multiple of 8 up to
    256 (Hopper's limit; JAX raises at trace time where a GPU's is lower)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 256)


def mosaic_ragged_usable(dtype, k: int, n: int) -> bool:
    """Whether `ragged_dot` of [M, k] x [G, k, n] in `dtype` runs the Mosaic GPU kernel here."""
    return (
        _mgpu is not None
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and k % BLOCK_K == 0
        and n % NARROW_TILES[1] == 0
        and _hopper_gpu()
        and _mosaic_self_check()
    )


def _self_check(kernel: str, fallback: str, tolerance: float, compute) -> bool:
    """Whether `compute()` -> (the kernel's output, a float32 numpy reference) agree within `tolerance`
    of the reference's largest value. Any failure, an exception included, is one warning and False.

    A kernel is checked eagerly even when first asked inside a trace: numpy inputs and an ahead-of-time
    compiled call (not `ensure_compile_time_eval`, which evaluates a kernel's body op by op and loses
    its mesh axes: on the GPU that once turned the prefill kernel off).
    """
    try:
        got, want = compute()
        err = float(np.max(np.abs(np.asarray(got, np.float32) - want)) / np.max(np.abs(want)))
        if not err < tolerance:
            raise ValueError(f"relative error {err:.3g} against a float32 reference")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"vl2_jax: the {kernel} failed its self-check ({type(e).__name__}: {str(e)[:200]}); "
                      f"{fallback} instead.", stacklevel=3)
        return False


@functools.cache
def _mosaic_self_check() -> bool:
    """The Mosaic kernel once on a small problem per tile set: it comes from JAX's examples, not a stable
    API, so a JAX whose version of it breaks or changes its signature gets the portable path, not a
    failing prefill."""

    def compute():
        rng = np.random.default_rng(0)
        sizes = np.array([100, 0, 150], np.int32)  # 6 rows in no group
        lhs = rng.standard_normal((256, BLOCK_K)).astype(jnp.bfloat16)
        got, want = [], []
        for n in (NARROW_TILES[1], WIDE_TILES[1]):  # one width per tile set
            rhs = rng.standard_normal((len(sizes), BLOCK_K, n)).astype(jnp.bfloat16)
            out = _mosaic_ragged_dot.lower(lhs, rhs, sizes).compile()(lhs, rhs, sizes)
            group = np.repeat(np.arange(len(sizes)), sizes)
            got.append(np.asarray(out)[: len(group)])
            want.append(np.einsum("mk,mkn->mn", lhs[: len(group)].astype(np.float32), rhs[group].astype(np.float32)))
        return np.concatenate(got, -1), np.concatenate(want, -1)

    return _self_check("Mosaic GPU grouped matmul", "prefill uses the slower portable dispatch", 2e-2, compute)


def ragged_tiles(n: int) -> tuple[int, int, int, int, int]:
    """The Mosaic kernel's tiles for output width `n` (see WIDE_TILES)."""
    return WIDE_TILES if n % WIDE_TILES[1] == 0 else NARROW_TILES


@jax.jit
def _mosaic_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G):
    # Its own jit, so that a model calling it per layer lowers the kernel once per shape, not per call.
    block_m, block_n, block_k, steps, grid_block_n = ragged_tiles(rhs_GKN.shape[-1])
    return _mgpu.ragged_dot(
        lhs_MK, rhs_GKN, group_sizes=group_sizes_G, block_m=block_m, block_n=block_n, block_k=block_k,
        max_concurrent_steps=steps, grid_block_n=grid_block_n,
    )


def ragged_dot(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, use_kernel: bool = True) -> jax.Array:
    """Grouped matmul: rows [M, K] in consecutive groups of `group_sizes` [G] times each group's matrix
    [G, K, N] -> [M, N] in the input dtype, accumulated in float32 (HIGHEST precision for float32).

    Rows past `sum(group_sizes)` belong to no group: their output is unspecified (the Mosaic kernel
    leaves them unwritten), so callers mask them. The kernel runs for M a multiple of `ROW_MULTIPLE` and
    at least `MIN_ROWS` (fewer are decode sizes, where the kernel is no faster than the grouped dispatch),
    and only with `use_kernel`.
    """
    m, k = lhs_MK.shape
    n = rhs_GKN.shape[-1]
    fits = m % ROW_MULTIPLE == 0 and m >= MIN_ROWS and lhs_MK.dtype == rhs_GKN.dtype
    if use_kernel and fits and local_arrays() and mosaic_ragged_usable(lhs_MK.dtype, k, n):
        with jax.disable_jit(False):  # its pipeline cannot run op by op: under `jax.disable_jit()` it crashed
            return _mosaic_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)
    precision = jax.lax.Precision.HIGHEST if lhs_MK.dtype == jnp.float32 else None
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, precision=precision)


# Gathered matrix-vector kernel: each program reduces one (row, expert) pair over K (or a slice of it,
# where K is split) for a block of output columns, block_k rows of the weight at a time. Float weights:
# MATVEC_BLOCK_N columns, block_k 256 where K allows, else MATVEC_BLOCK_K, K whole (a sweep on an H200
# at small's and base's expert shapes); quantized values: `matvec_tiles` (BENCHMARKS.md).
MATVEC_BLOCK_K, MATVEC_BLOCK_N, MATVEC_WARPS, MATVEC_STAGES = 128, 64, 4, 4


def matvec_block_k(k: int) -> int:
    """The K block of the Triton kernels for a contraction of length `k`."""
    return 2 * MATVEC_BLOCK_K if k % (2 * MATVEC_BLOCK_K) == 0 else MATVEC_BLOCK_K


def matvec_tiles(k: int, n: int, quantized: bool = False) -> tuple[int, ...]:
    """`gathered_matvec`'s default tiles for a contraction of `k` into `n` columns. Quantized values
    (1 byte) take 128-wide column blocks with K split over 4 (or 2) programs where K's 128-row blocks
    divide so, and `n` a multiple of 128: at batch-1 decode on an H100, 18-24% faster than the float
    tiles for small's gate/up and base's expert projections; without a split the wide blocks were
    slower (small's down, K 1408: 40.2 against 37.1 us), so such a K (or another `n`) keeps the float
    tiles (`benchmarks/tile_sweep.py --kernel matvec --weights int8`, BENCHMARKS.md)."""
    blocks = k // MATVEC_BLOCK_K
    split = next((s for s in (4, 2) if blocks % s == 0), 1)
    if not quantized or split == 1 or n % (2 * MATVEC_BLOCK_N):
        return matvec_block_k(k), MATVEC_BLOCK_N, MATVEC_WARPS, MATVEC_STAGES
    return MATVEC_BLOCK_K, 2 * MATVEC_BLOCK_N, MATVEC_WARPS, MATVEC_STAGES, split


def _triton_usable(dtype, k: int, n: int, self_check) -> bool:
    """The conditions the Triton kernels share: Pallas's Triton backend present, an NVIDIA GPU, bf16/f16,
    k and n multiples of the blocks; then `self_check()`, once."""
    return (
        pl_triton is not None
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and k % MATVEC_BLOCK_K == 0
        and n % MATVEC_BLOCK_N == 0
        and _cuda_gpu()
        and self_check()
    )


def gathered_matvec_usable(dtype, k: int, n: int, weight_dtype=None) -> bool:
    """Whether `gathered_matvec` of rows [., k] against experts [E, k, n] in `dtype` runs its kernel here
    (`_triton_usable`); `weight_dtype`: quantized values (int8, fp8) with scales, checked once too."""
    return _triton_usable(dtype, k, n, _checks(_matvec_self_check, "gathered_matvec", weight_dtype))


def _checks(self_check, kernel: str, weight_dtype):
    """The kernel's self-check, and for quantized weights its self-check on them (`_quantized_self_check`)."""
    if weight_dtype is None:
        return self_check
    return lambda: self_check() and _quantized_self_check(kernel, jnp.dtype(weight_dtype).name)


@functools.cache
def _cuda_gpu() -> bool:
    return jax.default_backend() == "gpu" and "NVIDIA" in jax.local_devices()[0].device_kind.upper()


def _gathered_matvec_kernel(ids_ref, x_ref, w_ref, *refs, block_k: int, k_steps: int):
    # ids_ref [1]: this row's expert; x_ref [K]: its input; w_ref [E, K, N]: all experts, read in place;
    # refs: (scales [E, N] float32, for quantized weights with K whole,) out [block_n]: the float32 sums
    # for this program's columns over its k_steps blocks of K, times the expert's column scales if
    # given, rounded to out's dtype as they are stored.
    out_ref = refs[-1]
    block_n = out_ref.shape[-1]
    expert = ids_ref[0]
    cols = pl.ds(pl.program_id(1) * block_n, block_n)
    first = pl.program_id(2) * k_steps

    def step(i, acc):
        rows = pl.ds(pl.multiple_of((first + i) * block_k, block_k), block_k)
        x = x_ref[rows].astype(jnp.float32)
        w = w_ref[expert, rows, cols].astype(jnp.float32)  # int8/fp8 values dequantize here, in registers
        return acc + jnp.sum(x[:, None] * w, axis=0)

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((block_n,), jnp.float32))
    out_ref[...] = (acc * refs[0][expert, cols] if len(refs) == 2 else acc).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rows_per_input", "interpret", "tiles", "out_dtype"))
def gathered_matvec(x_RK: jax.Array, w_EKN: jax.Array, ids_A: jax.Array, rows_per_input: int = 1,
                    interpret: bool = False, tiles: tuple[int, ...] | None = None,
                    scales_EN: jax.Array | None = None, out_dtype=jnp.float32) -> jax.Array:
    """out[a] = x[a // rows_per_input] @ w[ids[a]]: inputs [R, K], experts [E, K, N], expert ids [A] in
    [0, E) -> [A, N] (A = R * rows_per_input), summed in float32 and rounded to `out_dtype` as it is
    written (a 16-bit caller's cast without a kernel of its own). Ids must be in range: nothing checks them.
    With `scales_EN` [E, N] (float32), `w` holds quantized values (int8, fp8; `vl2_jax.quant`) and the
    product is x @ (w * scales): the values are upcast in registers, the column scales multiply the sums.

    One program per (row a, block of N columns, slice of K); the expert's weights are read where they
    lie, once per row. `interpret=True` runs the kernel's semantics on any backend (the CPU tests).
    `tiles` (block_k, block_n, warps, stages[, k_split]) overrides the defaults
    (`benchmarks/tile_sweep.py --kernel matvec` sweeps them); k_split > 1 splits K over that many programs, whose
    float32 partial sums are added after the kernel (more programs in flight for short row counts).
    """
    a = ids_A.shape[0]
    e, k, n = w_EKN.shape
    tiles = tiles or matvec_tiles(k, n, scales_EN is not None)
    block_k, block_n, warps, stages = tiles[:4]
    k_split = tiles[4] if len(tiles) > 4 else 1
    if k % (block_k * k_split) or n % block_n:
        raise ValueError(f"gathered_matvec: K={k} must be a multiple of block_k*k_split={block_k * k_split} "
                         f"and N={n} of block_n={block_n}")
    # The column scales multiply the sums in the kernel, or with K split, the added partial sums after it.
    scales = None if scales_EN is None else scales_EN.astype(jnp.float32)
    after = k_split > 1 and scales is not None
    scaled = () if scales is None or after else (scales,)
    stored = out_dtype if k_split == 1 else jnp.float32  # (partial sums stay float32 until added)
    partial_sums = pl.pallas_call(
        functools.partial(_gathered_matvec_kernel, block_k=block_k, k_steps=k // (block_k * k_split)),
        grid=(a, n // block_n, k_split),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, s: (i,)),
            pl.BlockSpec((None, k), lambda i, j, s: (i // rows_per_input, 0)),
            pl.BlockSpec((e, k, n), lambda i, j, s: (0, 0, 0)),
            *([pl.BlockSpec((e, n), lambda i, j, s: (0, 0))] if scaled else []),
        ],
        out_specs=pl.BlockSpec((None, None, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((k_split, a, n), stored),
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages) if pl_triton else None,
        interpret=interpret,
        name="gathered_matvec",
    )(ids_A.astype(jnp.int32), x_RK, w_EKN, *scaled)
    if k_split == 1:
        return partial_sums[0]
    sums = partial_sums.sum(0)
    return (sums * scales[ids_A] if after else sums).astype(out_dtype)


@functools.cache
def _matvec_self_check() -> bool:
    """`gathered_matvec` once on a small problem: a GPU or JAX on which the Triton kernel does not build
    (Pallas's Triton backend is deprecated) gets XLA's gather."""

    def compute():
        rng = np.random.default_rng(0)
        e, k, n, per = 5, 2 * MATVEC_BLOCK_K, 2 * MATVEC_BLOCK_N, 3
        x = rng.standard_normal((2, k)).astype(jnp.bfloat16)
        w = rng.standard_normal((e, k, n)).astype(jnp.bfloat16)
        ids = np.array([4, 0, 2, 2, 1, 4], np.int32)
        got = np.asarray(gathered_matvec.lower(x, w, ids, per).compile()(x, w, ids))
        # (and written as bf16, as the model's calls do: within the rounding of the float32 sums)
        narrow = gathered_matvec.lower(x, w, ids, per, out_dtype=jnp.bfloat16).compile()(x, w, ids)
        if not np.all(np.abs(np.asarray(narrow, np.float32) - got) <= np.abs(got) * 2.0**-8):
            raise ValueError("its bf16 output is not its float32 sums rounded")
        want = np.einsum("ak,akn->an", x[np.arange(len(ids)) // per].astype(np.float32), w[ids].astype(np.float32))
        return got, want

    return _self_check("gathered matrix-vector kernel", "decode uses XLA's gather", 1e-3, compute)


# Dense matrix-vector products (batch-1 decode's attention projections and shared experts) through the
# same kernel, as one "expert". XLA's GPU compiler rewrites a vector times a weight of fewer than
# ~10M elements into an elementwise multiply and a reduction, and writes the weight-sized product out
# between the two: small's 6-21 us per projection where reading the weight once takes 1-5 us (an
# H200 profile, BENCHMARKS.md). Larger float weights (the LM head, the dense layer's MLP) go to cuBLAS,
# which reads them near the HBM bandwidth, and keep XLA's dot; quantized ones take the kernel at any
# size (`dense_matvec_usable`).
DENSE_MATVEC_MAX_WEIGHT = 10_000_000
_MATVEC_MIN_PROGRAMS = 264  # two per streaming multiprocessor of an H200 (132)


def dense_matvec_tiles(k: int, n: int) -> tuple[int, int, int, int, int]:
    """Tiles for one row against a [k, n] weight: K in 128-row blocks, split over the fewest programs
    (a divisor of k / 128) that puts `_MATVEC_MIN_PROGRAMS` in flight, or as many as K allows."""
    blocks, columns = k // MATVEC_BLOCK_K, n // MATVEC_BLOCK_N
    split = next((d for d in range(1, blocks + 1) if blocks % d == 0 and d * columns >= _MATVEC_MIN_PROGRAMS), blocks)
    return MATVEC_BLOCK_K, MATVEC_BLOCK_N, MATVEC_WARPS, MATVEC_STAGES, split


def dense_matvec_usable(dtype, k: int, n: int, weight_dtype=None) -> bool:
    """Whether `dense_matvec` of one row against a [k, n] weight in `dtype` (or of quantized values in
    `weight_dtype`, with scales) runs its kernel here. Float weights of DENSE_MATVEC_MAX_WEIGHT elements
    or more keep XLA's dot (cuBLAS); quantized ones of any size take the kernel, which reads their
    values once: cuBLAS has no int8 x bf16 product, so XLA's dot would take the values widened to 16
    bits (small's int8 decode program counted more bytes than its bf16 one while every weight of
    10M elements or more, 367M elements in all, went that way; BENCHMARKS.md)."""
    if weight_dtype is None:
        return 0 < k * n < DENSE_MATVEC_MAX_WEIGHT and gathered_matvec_usable(dtype, k, n)
    return 0 < k * n and gathered_matvec_usable(dtype, k, n, weight_dtype)


def dense_matvec(x_1K: jax.Array, w_KN: jax.Array, interpret: bool = False,
                 scales_N: jax.Array | None = None, out_dtype=jnp.float32) -> jax.Array:
    """x [1, K] @ w [K, N] -> [1, N] (summed in float32, written as `out_dtype`) by the gathered
    matrix-vector kernel (`dense_matvec_tiles`); with `scales_N`, `w` holds quantized values and the
    product is x @ (w * scales)."""
    k, n = w_KN.shape
    return gathered_matvec(x_1K, w_KN[None], jnp.zeros((1,), jnp.int32), interpret=interpret,
                           tiles=dense_matvec_tiles(k, n), scales_EN=None if scales_N is None else scales_N[None],
                           out_dtype=out_dtype)


# Expert matmul: one program per (expert, block of N columns) multiplies the expert's
# rows [M, K] (M padded to EXPERT_ROWS_MULTIPLE for the tensor cores' 16-row minimum) by its weights.
EXPERT_ROWS_MULTIPLE = 16
# Triton keeps MATVEC_STAGES copies of a [M, block_k] row tile and a [block_k, block_n] weight tile in
# shared memory: an H200 block has 227 KiB (64 rows at block_k 256 asked for 256 KiB and failed to build).
_SHARED_MEMORY_BUDGET = 192 * 1024


def expert_matmul_block_k(m: int, k: int, itemsize: int = 2) -> int:
    """The largest K tile (256, 128 or 64, dividing `k`) whose pipelined row and weight tiles for `m`
    rows fit the shared-memory budget; 0 if none does."""
    for block_k in (2 * MATVEC_BLOCK_K, MATVEC_BLOCK_K, MATVEC_BLOCK_K // 2):
        if k % block_k == 0 and MATVEC_STAGES * (m + MATVEC_BLOCK_N) * block_k * itemsize <= _SHARED_MEMORY_BUDGET:
            return block_k
    return 0


def expert_matmul_usable(dtype, k: int, n: int, rows: int = EXPERT_ROWS_MULTIPLE, weight_dtype=None) -> bool:
    """Whether `expert_matmul` of [E, rows, k] against [E, k, n] runs its kernel here: `_triton_usable`,
    and a K tile for `rows` that fits shared memory (`expert_matmul_block_k`); `weight_dtype` as for
    `gathered_matvec_usable`."""
    return bool(expert_matmul_block_k(rows, k, jnp.dtype(dtype).itemsize)) and _triton_usable(
        dtype, k, n, _checks(_expert_matmul_self_check, "expert_matmul", weight_dtype))


@functools.cache
def _quantized_self_check(kernel: str, weight_dtype: str) -> bool:
    """`kernel` ("gathered_matvec" or "expert_matmul") once on bf16 rows against quantized values and
    scales: the float self-checks do not show that Triton lowers an int8 or fp8 load on this GPU. Not
    yet run on a GPU (written on the CPU); a failure turns the kernel off for quantized weights."""

    def compute():
        rng = np.random.default_rng(0)
        e, k, n = 4, 2 * MATVEC_BLOCK_K, 2 * MATVEC_BLOCK_N
        values = np.clip(np.round(rng.standard_normal((e, k, n)) * 40), -127, 127).astype(jnp.dtype(weight_dtype))
        scales = (rng.random((e, n)) + 0.5).astype(np.float32) / 64
        w = values.astype(np.float32) * scales[:, None, :]
        if kernel == "gathered_matvec":
            x = rng.standard_normal((2, k)).astype(jnp.bfloat16)
            ids = np.array([3, 0, 2, 2], np.int32)
            got = gathered_matvec.lower(x, values, ids, 2, scales_EN=scales).compile()(x, values, ids, scales_EN=scales)
            return got, np.einsum("ak,akn->an", x[np.arange(4) // 2].astype(np.float32), w[ids])
        sizes = np.array([3, 0, 16, 1], np.int32)
        xs = rng.standard_normal((e, EXPERT_ROWS_MULTIPLE, k)) * (np.arange(EXPERT_ROWS_MULTIPLE)[None, :, None] < sizes[:, None, None])
        xs = xs.astype(jnp.bfloat16)
        got = expert_matmul.lower(xs, values, sizes, scales_EN=scales).compile()(xs, values, sizes, scales_EN=scales)
        return got, np.einsum("emk,ekn->emn", xs.astype(np.float32), w)

    return _self_check(f"{kernel} kernel on {weight_dtype} weights", "XLA's path for quantized weights", 1e-2, compute)


def _expert_matmul_kernel(sizes_ref, x_ref, w_ref, *refs, block_k: int):
    # sizes_ref [1]: rows routed to this expert; x_ref [E, M, K]: every expert's rows (zero past its
    # size); w_ref [E, K, N]: the weights, read in place; refs: (scales [E, N] float32 for quantized
    # weights,) out [M, block_n]: float32.
    out_ref = refs[-1]
    e = pl.program_id(0)
    m, block_n = out_ref.shape
    cols = pl.ds(pl.program_id(1) * block_n, block_n)

    @pl.when(sizes_ref[0] > 0)
    def _():
        def step(i, acc):
            rows = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            x = x_ref[e, :, rows]
            w = w_ref[e, rows, cols].astype(x.dtype)  # quantized values dequantize here, in registers
            return acc + jax.lax.dot(x, w, preferred_element_type=jnp.float32)

        steps = w_ref.shape[1] // block_k
        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((m, block_n), jnp.float32))
        out_ref[...] = acc * refs[0][e, cols][None, :] if len(refs) == 2 else acc

    @pl.when(sizes_ref[0] == 0)
    def _():
        out_ref[...] = jnp.zeros((m, block_n), jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret",))
def expert_matmul(xs_EMK: jax.Array, w_EKN: jax.Array, sizes_E: jax.Array, interpret: bool = False,
                  scales_EN: jax.Array | None = None) -> jax.Array:
    """out[e] = xs[e] @ w[e] for every expert with sizes[e] > 0, zeros for the others: rows [E, M, K]
    (M a multiple of `EXPERT_ROWS_MULTIPLE`), weights [E, K, N], row counts [E] -> [E, M, N] float32.
    With `scales_EN` [E, N] (float32), `w` holds quantized values and the product is xs @ (w * scales):
    the values are cast to the rows' dtype in registers, the column scales multiply the float32 sums.

    The weights of an expert no row chose are never read. `interpret=True` runs the kernel's
    semantics on any backend (the CPU tests).
    """
    e, m, k = xs_EMK.shape
    n = w_EKN.shape[-1]
    if m % EXPERT_ROWS_MULTIPLE:
        raise ValueError(f"expert_matmul: {m} rows per expert, not a multiple of {EXPERT_ROWS_MULTIPLE}")
    block_k = expert_matmul_block_k(m, k, xs_EMK.dtype.itemsize)
    if not block_k:
        raise ValueError(f"expert_matmul: {m} rows x K {k} do not fit a tile in shared memory")
    scaled = () if scales_EN is None else (scales_EN.astype(jnp.float32),)
    return pl.pallas_call(
        functools.partial(_expert_matmul_kernel, block_k=block_k),
        grid=(e, n // MATVEC_BLOCK_N),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((e, m, k), lambda i, j: (0, 0, 0)),
            pl.BlockSpec((e, k, n), lambda i, j: (0, 0, 0)),
            *([pl.BlockSpec((e, n), lambda i, j: (0, 0))] if scaled else []),
        ],
        out_specs=pl.BlockSpec((None, m, MATVEC_BLOCK_N), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((e, m, n), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=MATVEC_WARPS, num_stages=MATVEC_STAGES) if pl_triton else None,
        interpret=interpret,
        name="expert_matmul",
    )(sizes_E.astype(jnp.int32), xs_EMK, w_EKN, *scaled)


@functools.cache
def _expert_matmul_self_check() -> bool:
    """`expert_matmul` once on a small problem, experts without rows included."""

    def compute():
        rng = np.random.default_rng(0)
        e, m, k, n = 4, EXPERT_ROWS_MULTIPLE, 2 * MATVEC_BLOCK_K, 2 * MATVEC_BLOCK_N
        sizes = np.array([3, 0, 16, 1], np.int32)
        xs = rng.standard_normal((e, m, k)) * (np.arange(m)[None, :, None] < sizes[:, None, None])
        xs, w = xs.astype(jnp.bfloat16), rng.standard_normal((e, k, n)).astype(jnp.bfloat16)
        got = expert_matmul.lower(xs, w, sizes).compile()(xs, w, sizes)
        return got, np.einsum("emk,ekn->emn", xs.astype(np.float32), w.astype(np.float32))

    return _self_check("expert matmul kernel", "decode batches use XLA's grouped matmul", 1e-3, compute)


# Blocked matmul (prefill, quantized experts): one program per (block of rows, block of N columns)
# multiplies the block's rows [M, K] by its expert's weights, block_k rows of them at a time.
BLOCKED_TILES = (128, 64, 4, 3)  # block_n, block_k, warps, stages: not yet swept on a GPU
BLOCKED_ROWS = (16, 128)  # the rows per block it takes: the tensor cores' 16-row minimum, and a tile that fits


def blocked_matmul_usable(dtype, k: int, n: int, weight_dtype) -> bool:
    """Whether `blocked_matmul` of `dtype` rows [., k] against [E, k, n] values of `weight_dtype`
    (quantized, with scales) runs its kernel here: `_triton_usable`, k and n multiples of its tiles,
    and its self-check on those values once."""
    block_n, block_k = BLOCKED_TILES[:2]
    return (k % block_k == 0 and n % block_n == 0 and weight_dtype is not None
            and _triton_usable(dtype, k, n, lambda: _blocked_matmul_self_check(jnp.dtype(weight_dtype).name)))


def _blocked_matmul_kernel(ids_ref, used_ref, x_ref, w_ref, scales_ref, out_ref, *, block_k: int):
    # ids_ref [1]: this block's expert; used_ref [1]: whether any row of the block is routed; x_ref
    # [M, K]: the block's rows; w_ref [E, K, N]: every expert's values, read in place; scales_ref [E, N]
    # float32; out_ref [M, block_n]: this program's columns, in the rows' dtype.
    m, block_n = out_ref.shape
    expert = ids_ref[0]
    cols = pl.ds(pl.program_id(0) * block_n, block_n)

    @pl.when(used_ref[0] > 0)
    def _():
        def step(i, acc):
            rows = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            x = x_ref[:, rows]
            w = w_ref[expert, rows, cols].astype(x.dtype)  # the values dequantize here, in registers
            return acc + jax.lax.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, w_ref.shape[1] // block_k, step, jnp.zeros((m, block_n), jnp.float32))
        out_ref[...] = (acc * scales_ref[expert, cols][None, :]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def blocked_matmul(xs_ZMK: jax.Array, w_EKN: jax.Array, scales_EN: jax.Array, expert_Z: jax.Array,
                   used_Z: jax.Array, interpret: bool = False, tiles: tuple[int, ...] | None = None) -> jax.Array:
    """out[z] = xs[z] @ (w[expert[z]] * scales[expert[z]]) for every block z with used[z]: blocks of rows
    [Z, M, K] (M in `BLOCKED_ROWS`), quantized values [E, K, N] (int8, fp8) and their column scales
    [E, N], each block's expert [Z] in [0, E) (unchecked), whether it holds any routed row [Z] ->
    [Z, M, N] in the rows' dtype, accumulated in float32. The rows of unused blocks are left unwritten
    (unspecified): callers read only the rows they routed.

    Each block reads its expert's values where they lie, in 1-byte tiles cast to the rows' dtype in
    registers: no 16-bit copy of the weights exists in memory. `interpret=True` runs the kernel's
    semantics on any backend (the CPU tests); `tiles` (block_n, block_k, warps, stages) overrides
    BLOCKED_TILES.
    """
    z, m, k = xs_ZMK.shape
    n = w_EKN.shape[-1]
    block_n, block_k, warps, stages = tiles or BLOCKED_TILES
    if not BLOCKED_ROWS[0] <= m <= BLOCKED_ROWS[1] or m & (m - 1):
        raise ValueError(f"blocked_matmul: {m} rows per block, not a power of two in {BLOCKED_ROWS}")
    if k % block_k or n % block_n:
        raise ValueError(f"blocked_matmul: K={k} must be a multiple of block_k={block_k} and N={n} of block_n={block_n}")
    # Column blocks vary fastest: the programs in flight share a few blocks' rows (read once, then from L2)
    # and consecutive blocks of one expert read its values while they are still in L2.
    return pl.pallas_call(
        functools.partial(_blocked_matmul_kernel, block_k=block_k),
        grid=(n // block_n, z),
        in_specs=[
            pl.BlockSpec((1,), lambda j, i: (i,)),
            pl.BlockSpec((1,), lambda j, i: (i,)),
            pl.BlockSpec((None, m, k), lambda j, i: (i, 0, 0)),
            pl.BlockSpec(w_EKN.shape, lambda j, i: (0, 0, 0)),
            pl.BlockSpec(scales_EN.shape, lambda j, i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, m, block_n), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((z, m, n), xs_ZMK.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages) if pl_triton else None,
        interpret=interpret,
        name="blocked_matmul",
    )(expert_Z.astype(jnp.int32), used_Z.astype(jnp.int32), xs_ZMK, w_EKN, scales_EN.astype(jnp.float32))


@functools.cache
def _blocked_matmul_self_check(weight_dtype: str) -> bool:
    """`blocked_matmul` once on bf16 rows against `weight_dtype` values, at the fewest and the most rows
    a block takes (the largest accumulator), several blocks per expert, an expert with none and an
    unused block."""

    def compute():
        rng = np.random.default_rng(0)
        e, (block_n, block_k) = 3, BLOCKED_TILES[:2]
        k, n = 4 * block_k, 2 * block_n
        values = np.clip(np.round(rng.standard_normal((e, k, n)) * 40), -127, 127).astype(jnp.dtype(weight_dtype))
        scales = (rng.random((e, n)) + 0.5).astype(np.float32) / 64
        w = values.astype(np.float32) * scales[:, None, :]
        expert, used = np.array([2, 2, 0, 0], np.int32), np.array([1, 1, 1, 0], np.int32)
        got, want = [], []
        for m in BLOCKED_ROWS:
            xs = rng.standard_normal((len(expert), m, k)).astype(jnp.bfloat16)
            out = blocked_matmul.lower(xs, values, scales, expert, used).compile()(xs, values, scales, expert, used)
            got.append(np.asarray(out)[:3].reshape(-1, n))
            want.append(np.einsum("zmk,zkn->zmn", xs[:3].astype(np.float32), w[expert[:3]]).reshape(-1, n))
        return np.concatenate(got), np.concatenate(want)

    return _self_check(f"blocked matmul kernel on {weight_dtype} weights",
                       "prefill's quantized experts take the grouped matmul over a 16-bit copy", 1e-2, compute)


# -- decode attention ---------------------------------------------------------------------------------
# One query token per row against that row's cached keys, read in place up to the row's own length: the
# plain path reads every row's keys up to the call's key bucket (the longest live row's, rounded up),
# through a score tensor, a masked softmax and a second product. Keys are walked in blocks of
# DECODE_BLOCK_K; each (row, key head) splits its keys over several programs when rows are few, so
# that about DECODE_MIN_PROGRAMS are in flight; their partial softmax sums are combined after the kernel.
DECODE_BLOCK_K, DECODE_WARPS, DECODE_STAGES = 64, 4, 2
DECODE_MIN_PROGRAMS, DECODE_MAX_SPLITS = 264, 16


def decode_splits(programs: int) -> int:
    """Key splits per (row, key head) for `programs` of them: the fewest (a power of two, at most
    DECODE_MAX_SPLITS) that put DECODE_MIN_PROGRAMS in flight."""
    splits = 1
    while splits < DECODE_MAX_SPLITS and programs * splits < DECODE_MIN_PROGRAMS:
        splits *= 2
    return splits


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def decode_attention_usable(dtype, queries: int, key_dims: tuple[int, ...], value_dim: int | None, keys: int) -> bool:
    """Whether `decode_attention` runs its kernel here for `queries` query heads per key head, key parts
    of `key_dims` and values of `value_dim` numbers (None: the values are the first key part), over
    cache rows of `keys` entries: Pallas's Triton backend on an NVIDIA GPU, bf16/f16, power-of-two sizes
    (Triton's blocks), one query head per key head or 16 or more (the tensor cores' rows); then its
    self-check at these head sizes, once."""
    dims = (*key_dims, *(() if value_dim is None else (value_dim,)))
    shapes = ((queries == 1 or (queries >= 16 and _power_of_two(queries)))
              and all(d >= 16 and _power_of_two(d) for d in dims) and keys % DECODE_BLOCK_K == 0)
    return (pl_triton is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and shapes and _cuda_gpu()
            and _decode_attention_self_check(jnp.dtype(dtype).name, queries, tuple(key_dims), value_dim))


def decode_warps(rows: int, width: int) -> int:
    """Warps of a decode attention program whose float32 accumulator is [rows, width]: 8 past 8192
    numbers (32 heads of MLA's 512-wide latent), so that it stays in registers."""
    return 8 if rows * width > 8192 else DECODE_WARPS


def _decode_attention_kernel(lengths_ref, *refs, parts: int, values: bool, splits: int, scale: float):
    # lengths_ref [1]: how many of this row's keys are valid; refs: q part i [M, A_i] (this row and key
    # head), its key part [S, A_i] (the row's whole cache, read in place), (values [S, U],) then the
    # outputs: o [M, U] float32, unnormalised, and the softmax's running max m [M] and sum l [M] over this
    # program's keys: a 1/splits share of the valid ones, in blocks of block_k.
    qs, ks = refs[:2 * parts:2], refs[1:2 * parts:2]
    v_ref = refs[2 * parts] if values else None
    o_ref, m_ref, l_ref = refs[-3:]
    rows, block_k = o_ref.shape[0], DECODE_BLOCK_K
    valid = lengths_ref[0]
    share = (valid + splits * block_k - 1) // (splits * block_k) * block_k
    start = pl.program_id(2) * share
    end = jnp.minimum(start + share, valid)
    q = [r[...].astype(jnp.float32) * scale for r in qs]

    def step(i, carry):
        o, m, l = carry
        at = pl.multiple_of(start + i * block_k, block_k)
        keys = pl.ds(at, block_k)
        blocks = [k[keys, :] for k in ks]
        if rows == 1:  # one query: a vector against the block, as multiplies and a sum
            s = sum(jnp.sum(qi[0][None, :] * k.astype(jnp.float32), axis=1) for qi, k in zip(q, blocks))[None]
        else:
            s = sum(jax.lax.dot_general(qi.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) for qi, k in zip(q, blocks))
        valid = at + jnp.arange(block_k) < end  # (the last block's keys past the end are not counted)
        s = jnp.where(valid[None, :], s, -jnp.inf)  # [M, block_k]
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_next[:, None])
        correction = jnp.exp(m - m_next)
        v = jnp.where(valid[:, None], v_ref[keys, :] if values else blocks[0], 0)
        if rows == 1:
            pv = jnp.sum(p[0][:, None] * v.astype(jnp.float32), axis=0)[None]
        else:
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return o * correction[:, None] + pv, m_next, l * correction + jnp.sum(p, axis=1)

    u = o_ref.shape[-1]
    init = (jnp.zeros((rows, u), jnp.float32), jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    steps = jnp.maximum((end - start + block_k - 1) // block_k, 0)
    o, m, l = jax.lax.fori_loop(0, steps, step, init)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


@functools.partial(jax.jit, static_argnames=("scale", "splits", "interpret"))
def decode_attention(q_parts: tuple[jax.Array, ...], k_parts: tuple[jax.Array, ...], v_BSGU: jax.Array | None,
                     lengths_N: jax.Array, scale: float, splits: int | None = None,
                     interpret: bool = False) -> jax.Array:
    """softmax(scale * sum_i q_i . k_i) . v over each row's first `lengths` keys -> [N, G, M, U] in q's
    dtype.

    q parts [N, G, M, A_i]: N rows (the first N of the cache's B), G key heads, M query heads each; key
    parts [B, S, G, A_i] and values [B, S, G, U] (None: the values are the first key part, as MLA's
    latent) are whole cache arrays, read in place: keys of row n at positions < lengths[n] (at least 1)
    count, nothing past them is read, and rows past N are not read. MHA: one part (K); MLA's absorbed
    form: the latent (R) and the rope key (J) parts, values the latent, G = 1.

    One program per (row, key head, key split); `splits` (default `decode_splits`) shares each row's
    keys out; their float32 partial sums are combined here. `interpret=True` runs the kernel's semantics
    on any backend (the CPU tests).
    """
    n, g, rows = q_parts[0].shape[:3]
    b, s = k_parts[0].shape[:2]
    u = (k_parts[0] if v_BSGU is None else v_BSGU).shape[-1]
    splits = splits or decode_splits(n * g)
    if s % DECODE_BLOCK_K or b < n:
        raise ValueError(f"decode_attention: {s} keys a row must be a multiple of {DECODE_BLOCK_K}, and the cache's "
                         f"{b} rows at least the {n} queried")
    head = lambda shape: pl.BlockSpec((None, None, *shape), lambda i, j, p: (i, j) + (0,) * len(shape))
    keys = lambda a: pl.BlockSpec((None, s, None, a.shape[-1]), lambda i, j, p: (i, 0, j, 0))
    values = () if v_BSGU is None else (v_BSGU,)
    out = pl.BlockSpec((None, None, None, rows, u), lambda i, j, p: (p, i, j, 0, 0))
    stat = pl.BlockSpec((None, None, None, rows), lambda i, j, p: (p, i, j, 0))
    o, m, l = pl.pallas_call(
        functools.partial(_decode_attention_kernel, parts=len(q_parts), values=bool(values), splits=splits,
                          scale=scale),
        grid=(n, g, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, j, p: (i,)),
                  *(spec for q, k in zip(q_parts, k_parts) for spec in (head(q.shape[2:]), keys(k))),
                  *(keys(v) for v in values)],
        out_specs=[out, stat, stat],
        out_shape=[jax.ShapeDtypeStruct((splits, n, g, rows, u), jnp.float32),
                   *[jax.ShapeDtypeStruct((splits, n, g, rows), jnp.float32)] * 2],
        compiler_params=(pl_triton.CompilerParams(num_warps=decode_warps(rows, u), num_stages=DECODE_STAGES)
                         if pl_triton else None),
        interpret=interpret,
        name="decode_attention",
    )(lengths_N.astype(jnp.int32), *(a for pair in zip(q_parts, k_parts) for a in pair), *values)
    weight = jnp.exp(m - jnp.max(m, axis=0))  # [P, N, G, M]: each split's share of the softmax
    total = jnp.sum(o * weight[..., None], axis=0) / jnp.sum(l * weight, axis=0)[..., None]
    return total.astype(q_parts[0].dtype)


def decode_attention_reference(q_parts, k_parts, v_BSGU, lengths_N, scale: float) -> np.ndarray:
    """`decode_attention` in float32 numpy (the tests' and the self-check's reference)."""
    n = q_parts[0].shape[0]
    f = lambda a: np.asarray(a, np.float32)
    s = sum(np.einsum("ngma,nsga->ngms", f(q), f(k)[:n]) for q, k in zip(q_parts, k_parts)) * scale
    s = np.where(np.arange(s.shape[-1]) < np.asarray(lengths_N)[:, None, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    v = f(k_parts[0] if v_BSGU is None else v_BSGU)[:n]
    return np.einsum("ngms,nsgu->ngmu", p / p.sum(-1, keepdims=True), v)


@functools.cache
def _decode_attention_self_check(dtype: str, queries: int, key_dims: tuple[int, ...], value_dim: int | None) -> bool:
    """`decode_attention` once at these head sizes in `dtype` (as `decode_attention_usable` takes them;
    two key heads), over rows of 1, 63, 64, 65, 200 and all 256 keys valid, in one program a row (up to
    four blocks: the running softmax rescaled) and split as the kernel splits them: a JAX or GPU on which
    the Triton kernel does not build (its shared memory, its registers) gets the masked softmax."""

    def compute():
        rng = np.random.default_rng(0)
        lengths = np.array([1, 63, 64, 65, 200, 4 * DECODE_BLOCK_K], np.int32)
        b, s, g = len(lengths) + 1, 4 * DECODE_BLOCK_K, 2
        draw = lambda *shape: rng.standard_normal(shape).astype(jnp.dtype(dtype))
        q_parts = tuple(draw(len(lengths), g, queries, d) for d in key_dims)
        k_parts = tuple(draw(b, s, g, d) for d in key_dims)
        args = (q_parts, k_parts, None if value_dim is None else draw(b, s, g, value_dim), lengths)
        got = [decode_attention.lower(*args, 0.125, splits).compile()(*args) for splits in (1, None)]
        want = decode_attention_reference(*args, 0.125)
        return np.stack([np.asarray(a, np.float32) for a in got]), np.stack([want, want])

    return _self_check(f"decode attention kernel ({queries} query heads a key head, keys {key_dims}, values "
                       f"{value_dim or key_dims[0]}, {dtype})", "decoding attends through the masked softmax", 2e-2, compute)
