"""Every MoE dispatch against the plain dense path on random arrays, including the grouped dispatch's
capacity overflow and the out-of-range expert ids that expert parallelism passes for remote experts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vl2_jax
from vl2_jax.kernels import mosaic_ragged_usable
from vl2_jax.modules.moe import (
    block_rows,
    choose_dispatch,
    combine,
    grouped_capacity,
    outputs_blocked,
    outputs_grouped,
    run_experts,
)

E, D, F, N, X = 16, 24, 20, 80, 4
FAST = ("gather", "grouped", "ragged", "blocked")


@pytest.fixture(scope="module")
def arrays():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (N, D))
    gate_up = jax.random.normal(k[1], (E, D, 2, F)) / D**0.5
    down = jax.random.normal(k[2], (E, F, D)) / F**0.5
    weights, idx = jax.lax.top_k(jax.nn.softmax(jax.random.normal(k[3], (N, E))), X)
    return x, gate_up, down, weights, idx.astype(jnp.int32)


def rel_err(got, want) -> float:
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def f32(a):
    return a.astype(jnp.float32)


def bf16_problem(seed: int, e: int, d: int, f: int, x: int, n: int):
    """Random bf16 tokens [n, d] and experts (gate/up [e, d, 2, f], down [e, f, d]), with a softmax
    router's top-x weights [n, x] (float32) and ids [n, x] (int32)."""
    k = jax.random.split(jax.random.key(seed), 4)
    bf = lambda a: a.astype(jnp.bfloat16)
    xs = bf(jax.random.normal(k[0], (n, d)))
    gate_up = bf(jax.random.normal(k[1], (e, d, 2, f)) / d**0.5)
    down = bf(jax.random.normal(k[2], (e, f, d)) / f**0.5)
    weights, idx = jax.lax.top_k(jax.nn.softmax(jax.random.normal(k[3], (n, e))), x)
    return xs, gate_up, down, weights, idx.astype(jnp.int32)


def dense(x, gate_up, down, weights, idx):
    with jax.default_matmul_precision("highest"):
        return run_experts("dense", x, gate_up, down, weights, idx)


@pytest.mark.parametrize("impl", FAST)
def test_dispatch_equals_dense(arrays, impl):
    with jax.default_matmul_precision("highest"):
        got = jax.jit(run_experts, static_argnums=0)(impl, *arrays)
    assert rel_err(got, dense(*arrays)) < 1e-5


@pytest.mark.parametrize("impl", FAST)
def test_out_of_range_ids_count_for_nothing(arrays, impl):
    x, gate_up, down, weights, idx = arrays
    idx = idx.at[:, 0].set(-3).at[:, 1].add(E)  # what a device sees for experts held elsewhere
    want = dense(x, gate_up, down, weights, idx)
    kept = dense(x, gate_up, down, weights[:, 2:], idx[:, 2:])
    assert rel_err(want, kept) < 1e-6  # the dense path drops them ...
    with jax.default_matmul_precision("highest"):
        got = run_experts(impl, x, gate_up, down, weights, idx)
    assert rel_err(got, want) < 1e-5  # ... and so does every other


def test_grouped_overflow_falls_back_to_dense(arrays):
    """Every token on the same 4 experts: 80 rows each, far over the capacity; nothing is dropped."""
    x, gate_up, down, weights, _ = arrays
    idx = jnp.tile(jnp.arange(X, dtype=jnp.int32), (N, 1))
    cap = grouped_capacity(N, X, E)
    assert cap < N
    with jax.default_matmul_precision("highest"):
        got = combine(jax.jit(outputs_grouped)(x, gate_up, down, idx), weights, x.dtype)
        exact_fit = combine(outputs_grouped(x, gate_up, down, idx, capacity=N), weights, x.dtype)
    want = dense(x, gate_up, down, weights, idx)
    assert rel_err(got, want) < 1e-5
    assert rel_err(exact_fit, want) < 1e-5


@pytest.mark.parametrize("impl, skewed", [("grouped", False), ("grouped", True), ("blocked", False), ("blocked", True)])
def test_training_dispatch_gradients_equal_dense(arrays, impl, skewed):
    """Training runs the grouped and blocked dispatches through XLA: their gradients (tokens, both
    projections, router weights) are the dense path's, with the tokens spread over the experts and with
    every token on the same few (grouped: overflow, so dense; blocked: one expert's many blocks)."""
    x, gate_up, down, weights, idx = arrays
    if skewed:
        idx = jnp.tile(jnp.arange(X, dtype=jnp.int32), (N, 1))
    probe = jax.random.normal(jax.random.key(7), (N, D))

    def objective(impl):
        def f(x, gate_up, down, weights):
            y = run_experts(impl, x, gate_up, down, weights, idx, use_kernel=False)
            return jnp.sum(y * probe)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    with jax.default_matmul_precision("highest"):
        got = objective(impl)(x, gate_up, down, weights)
        want = objective("dense")(x, gate_up, down, weights)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("rows", [8, 16, 128])
def test_blocked_dispatch_any_block_size(arrays, rows):
    """Groups larger and smaller than a block, blocks past the last group, and out-of-range ids."""
    x, gate_up, down, weights, idx = arrays
    idx = idx.at[:5, 0].set(-1).at[5:9, 1].set(E + 2)
    want = dense(x, gate_up, down, weights, idx)
    with jax.default_matmul_precision("highest"):
        got = combine(jax.jit(outputs_blocked, static_argnums=4)(x, gate_up, down, idx, rows), weights, x.dtype)
    assert rel_err(got, want) < 1e-5


def test_block_rows():
    assert block_rows(1, 64) == 8  # at least 8
    assert block_rows(6 * 300, 64) == 16  # 28 per expert: the power of two below
    assert block_rows(6 * 4096, 64) == 128  # at most 128


def test_grouped_capacity():
    assert grouped_capacity(1, 6, 64) == 1  # never more rows than tokens
    assert grouped_capacity(32, 6, 64) == 32  # decode batches: no overflow check
    assert grouped_capacity(1088, 6, 64) == 208  # 2 x 102 tokens, rounded up to a multiple of 8
    assert np.all([grouped_capacity(n, 6, 64) <= n for n in range(1, 300)])


def test_auto_dispatch_choice():
    """gather at decode batch 1-2, grouped above; "ragged" only where the Mosaic GPU kernel runs."""
    w = jnp.zeros((64, 128, 2, 128), jnp.bfloat16)
    assert choose_dispatch("auto", 2, 6, w) == "gather"
    assert choose_dispatch("auto", 8, 6, w) == "grouped"
    prefill = choose_dispatch("auto", 1042, 6, w)
    assert prefill == ("ragged" if mosaic_ragged_usable(jnp.bfloat16, 128, 256) else "grouped")
    assert choose_dispatch("auto", 1042, 6, w.astype(jnp.float32)) == "grouped"  # the kernel is bf16/f16 only
    assert choose_dispatch("dense", 1, 6, w) == "dense"
    if jax.default_backend() == "cpu":
        assert not mosaic_ragged_usable(jnp.bfloat16, 128, 256)


def test_ragged_never_reads_rows_outside_the_groups(arrays, monkeypatch):
    """The Mosaic kernel leaves rows past the groups unwritten: with a stand-in that fills them with NaN,
    the ragged dispatch still equals dense, ids of remote experts give exact zeros, and nothing is NaN.
    N*X = 111 rows, so one padding row too."""
    from vl2_jax.modules import moe

    def nan_outside(lhs, rhs, sizes, use_kernel=True):
        out = jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST)
        return jnp.where((jnp.arange(lhs.shape[0]) < sizes.sum())[:, None], out, jnp.nan)

    monkeypatch.setattr(moe, "ragged_dot", nan_outside)
    x, gate_up, down, weights, idx = (a[:37] for a in arrays)
    idx = idx[:, :3].at[:4, 0].set(-3).at[4:8, 1].add(E)
    weights = weights[:, :3]
    y = moe.outputs_ragged(x, gate_up, down, idx)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert bool(jnp.all(y[:4, 0] == 0)) and bool(jnp.all(y[4:8, 1] == 0))
    assert rel_err(combine(y, weights, x.dtype), dense(x, gate_up, down, weights, idx)) < 1e-5


def test_auto_picks_the_kernel_only_where_the_per_device_width_fits(monkeypatch):
    """With a Hopper GPU faked: prefill resolves to "ragged" when each device's slice of the expert width
    fits the kernel's tiles, "grouped" when a tensor split cuts it too thin (tiny's 896 / 4 = 224)."""
    from vl2_jax import kernels
    from vl2_jax.config import PRESETS
    from vl2_jax.sharding import make_mesh

    monkeypatch.setattr(kernels, "_hopper_gpu", lambda: True)
    monkeypatch.setattr(kernels, "_mosaic_self_check", lambda: True)
    if kernels._mgpu is None:
        pytest.skip("this JAX has no Mosaic GPU ragged_dot module")
    if jax.device_count() < 8:
        pytest.skip("the meshes below need 8 devices (the CPU suite fakes 8 host devices)")
    cfg = PRESETS["tiny"]
    c = cfg.language
    w = jax.ShapeDtypeStruct((c.n_routed_experts, c.hidden_size, 2, c.moe_intermediate_size), jnp.bfloat16)
    assert choose_dispatch("auto", 1042, 6, w) == "ragged"
    assert choose_dispatch("auto", 32, 6, w) == "grouped"  # decode batches stay grouped
    with jax.set_mesh(make_mesh("expert=4,tensor=2", cfg)):
        assert choose_dispatch("auto", 1042, 6, w) == "ragged"  # 448 wide per device
    with jax.set_mesh(make_mesh("expert=2,tensor=4", cfg)):
        assert choose_dispatch("auto", 1042, 6, w) == "grouped"  # 224 wide: not a multiple of 128
    with jax.set_mesh(make_mesh("data=8", cfg)):  # no shard_map: the kernel would see global arrays
        assert choose_dispatch("auto", 1042, 6, w) == "grouped"


def test_kernels_see_only_per_device_arrays():
    """`local_arrays`: true on one device and inside shard_map, false under automatic partitioning."""
    from vl2_jax.config import PRESETS
    from vl2_jax.kernels import local_arrays
    from vl2_jax.sharding import make_mesh

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (the CPU suite fakes 8 host devices)")
    P = jax.sharding.PartitionSpec
    seen = {}

    def f(x):
        seen["global"] = local_arrays()

        def body(x):
            seen["local"] = local_arrays()
            return x

        return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=P(), out_specs=P())(x)

    assert local_arrays()
    with jax.set_mesh(make_mesh("data=2", PRESETS["test"], devices=jax.devices()[:2])):
        jax.jit(f)(jnp.ones(4))
    assert seen == {"global": False, "local": True}


def _hopper_with_kernel() -> bool:
    from vl2_jax import kernels

    return kernels._mgpu is not None and kernels._hopper_gpu()


@pytest.mark.skipif(not _hopper_with_kernel(), reason="the Mosaic GPU grouped matmul needs a Hopper GPU")
def test_kernel_self_check_passes_on_hopper_inside_a_trace():
    """On the GPU the kernel is meant for, its self-check passes, also when first asked while a model
    is being traced (as the prefill does): a failing check would silently cost the fast prefill."""
    from vl2_jax import kernels

    kernels._mosaic_self_check.cache_clear()
    assert bool(jax.jit(lambda: jnp.array(kernels._mosaic_self_check()))())
    assert mosaic_ragged_usable(jnp.bfloat16, 128, 128)


@pytest.mark.skipif(not _hopper_with_kernel(), reason="the Mosaic GPU grouped matmul needs a Hopper GPU")
@pytest.mark.parametrize("n,skewed", [(1042, False), (1042, True), (30, False)])
def test_mosaic_ragged_equals_dense_bf16(n, skewed):
    """The GPU kernel path of the ragged dispatch (bf16, real tile-divisible sizes) against the dense
    path in float32: the bf16 error only (relative to the largest output), including ids of remote
    experts, a row count that is not a multiple of the tile, and (30 tokens) just over one row tile."""
    e, d, f, x = 64, 256, 128, 6
    k = jax.random.split(jax.random.key(1), 4)
    xs = jax.random.normal(k[0], (n, d))
    gate_up = jax.random.normal(k[1], (e, d, 2, f)) / d**0.5
    down = jax.random.normal(k[2], (e, f, d)) / f**0.5
    logits = jax.random.normal(k[3], (n, e)) + (jnp.arange(e) < 4) * (6.0 if skewed else 0.0)
    weights, idx = jax.lax.top_k(jax.nn.softmax(logits), x)
    idx = idx.astype(jnp.int32).at[:5, 0].set(-1)
    bf = lambda a: a.astype(jnp.bfloat16)
    got = jax.jit(run_experts, static_argnums=0)("ragged", bf(xs), bf(gate_up), bf(down), weights, idx)
    want = dense(bf(xs).astype(jnp.float32), bf(gate_up).astype(jnp.float32), bf(down).astype(jnp.float32), weights, idx)
    assert rel_err(got.astype(jnp.float32), want) < 1e-2
    assert bool(jnp.all(jnp.isfinite(got)))


@pytest.mark.skipif(not _hopper_with_kernel(), reason="the Mosaic GPU grouped matmul needs a Hopper GPU")
def test_mosaic_ragged_runs_under_disable_jit(monkeypatch):
    """Eager debugging (`jax.disable_jit()`, as `benchmarks/bf16_drift.routed` does) still gets the
    kernel and its result: its pipeline once crashed when run op by op."""
    from vl2_jax import kernels

    assert mosaic_ragged_usable(jnp.bfloat16, 128, 256)  # its self-check (cached) runs the real kernel first
    calls, kernel = [], kernels._mosaic_ragged_dot
    monkeypatch.setattr(kernels, "_mosaic_ragged_dot", lambda *a: calls.append(1) or kernel(*a))
    sizes = np.array([100, 0, 150], np.int32)
    lhs = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
    rhs = jax.random.normal(jax.random.key(1), (3, 128, 256), jnp.bfloat16)
    with jax.disable_jit():
        got = np.asarray(kernels.ragged_dot(lhs, rhs, sizes), np.float32)[:250]
    group = np.repeat(np.arange(3), sizes)
    want = np.einsum("mk,mkn->mn", np.asarray(lhs, np.float32)[:250], np.asarray(rhs, np.float32)[group])
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert calls == [1]


def test_kernel_self_check_guards_against_a_broken_kernel(monkeypatch):
    """A kernel that fails (an incompatible JAX) or computes wrong values is detected once, inside a
    trace too, with one warning, and the dispatch falls back to the portable path."""
    from vl2_jax import kernels

    def check(stand_in):
        kernels._mosaic_self_check.cache_clear()
        monkeypatch.setattr(kernels, "_mosaic_ragged_dot", jax.jit(stand_in))
        return jax.jit(lambda: jnp.array(kernels._mosaic_self_check()))()

    def broken(*args):
        raise TypeError("ragged_dot() got an unexpected keyword argument 'block_m'")

    exact = lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)
    with pytest.warns(UserWarning, match="self-check"):
        assert not check(broken)
    with pytest.warns(UserWarning, match="relative error"):
        assert not check(lambda lhs, rhs, sizes: exact(lhs, rhs, sizes) * 1.1)
    assert check(exact)
    # Like the real kernel, a stand-in whose body names a mesh axis: checked eagerly op by op, it
    # would lose that axis ("unbound axis name"), which once turned the kernel off on the GPU.
    mesh = jax.make_mesh((1,), ("sm",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:1])
    P = jax.sharding.PartitionSpec

    def with_axis(lhs, rhs, sizes):
        def body(lhs, rhs, sizes):
            return exact(lhs, rhs, sizes) + 0 * jax.lax.axis_index("sm").astype(lhs.dtype)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(),
                             check_vma=False)(lhs, rhs, sizes)

    assert check(with_axis)
    kernels._mosaic_self_check.cache_clear()


@pytest.mark.parametrize("dtype,k_blocks,tiles", [
    (jnp.float32, 3, None), (jnp.bfloat16, 3, None), (jnp.bfloat16, 4, None),
    (jnp.bfloat16, 4, (128, 64, 4, 4, 2)), (jnp.bfloat16, 4, (128, 32, 4, 4, 4)),
])
def test_gathered_matvec_kernel_semantics(dtype, k_blocks, tiles):
    """The decode kernel's program (run by Pallas's interpreter, so on any backend): several column and
    row blocks (K of 3 blocks of 128, or 4: two of 256, or split over 2 or 4 programs), rows sharing an
    input (`rows_per_input`), repeated and unordered expert ids."""
    from vl2_jax.kernels import MATVEC_BLOCK_K, MATVEC_BLOCK_N, gathered_matvec

    rng = np.random.default_rng(3)
    e, k, n, per = 7, k_blocks * MATVEC_BLOCK_K, 5 * MATVEC_BLOCK_N, 3
    x = rng.standard_normal((2, k)).astype(dtype)
    w = rng.standard_normal((e, k, n)).astype(dtype)
    ids = np.array([6, 0, 3, 3, 1, 6], np.int32)
    got = np.asarray(gathered_matvec(x, w, ids, rows_per_input=per, interpret=True, tiles=tiles))
    want = np.einsum("ak,akn->an", x[np.arange(len(ids)) // per].astype(np.float64), w[ids].astype(np.float64))
    assert got.dtype == np.float32 and got.shape == (len(ids), n)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("tiles", [None, (128, 64, 4, 4, 2)], ids=["whole K", "K split"])
@pytest.mark.parametrize("quantized", [False, True])
def test_gathered_matvec_writes_16_bit_values_as_a_cast_of_its_float32_sums(tiles, quantized):
    """out_dtype=bfloat16: the kernel rounds as it writes (or, with K split, after adding the partial
    sums), bit for bit the float32 result cast to bfloat16, with quantized values' scales too."""
    from vl2_jax.kernels import MATVEC_BLOCK_K, MATVEC_BLOCK_N, gathered_matvec

    rng = np.random.default_rng(5)
    e, k, n = 3, 4 * MATVEC_BLOCK_K, 2 * MATVEC_BLOCK_N
    x = rng.standard_normal((2, k)).astype(jnp.bfloat16)
    w = (rng.integers(-127, 128, (e, k, n)).astype(np.int8) if quantized
         else rng.standard_normal((e, k, n)).astype(jnp.bfloat16))
    scales = {"scales_EN": rng.uniform(1e-3, 1e-2, (e, n)).astype(np.float32)} if quantized else {}
    ids = np.array([2, 0, 1, 2], np.int32)
    run = lambda dtype: np.asarray(gathered_matvec(x, w, ids, rows_per_input=2, interpret=True, tiles=tiles,
                                                   out_dtype=dtype, **scales))
    wide, narrow = run(jnp.float32), run(jnp.bfloat16)
    assert wide.dtype == np.float32 and narrow.dtype == jnp.bfloat16
    np.testing.assert_array_equal(narrow.view(np.uint16), wide.astype(jnp.bfloat16).view(np.uint16))


def test_gathered_matvec_refuses_tiles_that_do_not_divide():
    from vl2_jax.kernels import gathered_matvec

    x, w, ids = np.ones((1, 384), np.float32), np.ones((2, 384, 64), np.float32), np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="multiple of block_k"):
        gathered_matvec(x, w, ids, interpret=True, tiles=(128, 64, 4, 4, 2))


@pytest.mark.parametrize("tokens", [1, 2])
def test_gather_dispatch_through_the_kernel_equals_dense(monkeypatch, tokens):
    """The gather dispatch with its kernel switched in (interpreted on CPU) against the dense path in
    float32, bf16 weights at tile-divisible sizes, with and without out-of-range (remote) ids."""
    import functools

    from vl2_jax.kernels import MATVEC_BLOCK_K, gathered_matvec
    from vl2_jax.modules import moe

    monkeypatch.setattr(moe, "gathered_matvec_usable", lambda *a: True)
    monkeypatch.setattr(moe, "gathered_matvec", functools.partial(gathered_matvec, interpret=True))
    e, d, f, x = 12, 2 * MATVEC_BLOCK_K, MATVEC_BLOCK_K, 3
    xs, gate_up, down, weights, idx = bf16_problem(5, e, d, f, x, tokens)
    for ids, in_range in ((idx, True), (idx.at[0, 0].set(-2).at[-1, 1].add(e), False)):
        got = run_experts("gather", xs, gate_up, down, weights, ids, ids_in_range=in_range)
        want = dense(f32(xs), f32(gate_up), f32(down), weights, ids)
        assert rel_err(f32(got), want) < 1e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the gathered matrix-vector kernel runs on NVIDIA GPUs")
def test_gathered_matvec_kernel_on_the_gpu():
    """On a GPU the kernel builds and passes its self-check (inside a trace too), and the bf16 gather
    dispatch at small's real sizes agrees with the float32 dense path."""
    from vl2_jax import kernels

    kernels._matvec_self_check.cache_clear()
    assert bool(jax.jit(lambda: jnp.array(kernels._matvec_self_check()))())
    e, d, f, x = 64, 2048, 1408, 6
    assert kernels.gathered_matvec_usable(jnp.bfloat16, d, 2 * f) and kernels.gathered_matvec_usable(jnp.bfloat16, f, d)
    xs, gate_up, down, weights, idx = bf16_problem(2, e, d, f, x, 2)
    got = jax.jit(run_experts, static_argnums=0)("gather", xs, gate_up, down, weights, idx)
    want = dense(f32(xs), f32(gate_up), f32(down), weights, idx)
    assert rel_err(f32(got), want) < 1e-2


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the failure path where the kernel cannot build")
def test_matvec_self_check_fails_closed_where_the_kernel_cannot_build(monkeypatch):
    """Where Triton cannot lower (here: the CPU), the self-check warns once and says no; with the
    kernel's semantics in place (Pallas's interpreter) it says yes, inside a trace too."""
    import functools

    from vl2_jax import kernels

    kernels._matvec_self_check.cache_clear()
    with pytest.warns(UserWarning, match="gathered matrix-vector kernel failed its self-check"):
        assert not kernels._matvec_self_check()
    interpreted = jax.jit(functools.partial(kernels.gathered_matvec, interpret=True), static_argnums=3,
                          static_argnames="out_dtype")
    monkeypatch.setattr(kernels, "gathered_matvec", interpreted)
    kernels._matvec_self_check.cache_clear()
    assert bool(jax.jit(lambda: jnp.array(kernels._matvec_self_check()))())
    kernels._matvec_self_check.cache_clear()


def test_a_jax_without_pallas_triton_uses_xla_gather(monkeypatch):
    """The Triton backend is deprecated: without it the kernel is simply not used (and the library
    still imports), while its semantics still run interpreted."""
    from vl2_jax import kernels

    monkeypatch.setattr(kernels, "_cuda_gpu", lambda: True)
    monkeypatch.setattr(kernels, "_matvec_self_check", lambda: True)
    assert kernels.gathered_matvec_usable(jnp.bfloat16, 256, 128) == (kernels.pl_triton is not None)
    monkeypatch.setattr(kernels, "pl_triton", None)
    assert not kernels.gathered_matvec_usable(jnp.bfloat16, 256, 128)
    x, w, ids = np.ones((1, 128), np.float32), np.ones((2, 128, 64), np.float32), np.array([1], np.int32)
    assert np.allclose(np.asarray(kernels.gathered_matvec(x, w, ids, interpret=True)), 128.0)


def test_expert_matmul_kernel_semantics():
    """The decode-batch kernel (interpreted): each expert's rows times its weights, zeros
    for experts no row chose, several row/column/K blocks."""
    from vl2_jax.kernels import EXPERT_ROWS_MULTIPLE, MATVEC_BLOCK_K, MATVEC_BLOCK_N, expert_matmul

    rng = np.random.default_rng(4)
    e, m, k, n = 5, EXPERT_ROWS_MULTIPLE, 3 * MATVEC_BLOCK_K, 3 * MATVEC_BLOCK_N
    sizes = np.array([2, 0, 16, 0, 7], np.int32)
    xs = (rng.standard_normal((e, m, k)) * (np.arange(m)[None, :, None] < sizes[:, None, None])).astype(np.float32)
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    with jax.default_matmul_precision("highest"):  # a GPU's default float32 dot is TF32
        got = np.asarray(expert_matmul(xs, w, sizes, interpret=True))
    want = np.einsum("emk,ekn->emn", xs.astype(np.float64), w.astype(np.float64))
    assert got.dtype == np.float32 and np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert not got[[1, 3]].any()
    with pytest.raises(ValueError, match="multiple of"):
        expert_matmul(xs[:, :8], w, sizes, interpret=True)


def test_expert_matmul_tiles_fit_shared_memory(monkeypatch):
    """64 rows at block_k 256 asked an H200 for 256 KiB of shared memory (227 available) and failed to
    build: larger row counts take smaller K tiles, and too many rows none, so the kernel is not used."""
    from vl2_jax import kernels
    from vl2_jax.kernels import expert_matmul_block_k

    assert expert_matmul_block_k(16, 2048) == 256 and expert_matmul_block_k(16, 1408) == 128
    assert expert_matmul_block_k(64, 2048) == 128
    assert expert_matmul_block_k(4096, 2048) == 0
    monkeypatch.setattr(kernels, "_triton_usable", lambda *a: True)  # as on an NVIDIA GPU
    assert kernels.expert_matmul_usable(jnp.bfloat16, 2048, 2816, rows=64)
    assert not kernels.expert_matmul_usable(jnp.bfloat16, 2048, 2816, rows=4096)


@pytest.fixture
def expert_kernel_calls(monkeypatch):
    """The expert kernel switched in (interpreted) wherever the grouped dispatch would run it; the list
    grows by one per call."""
    from vl2_jax.kernels import expert_matmul
    from vl2_jax.modules import moe

    calls = []

    def counted(*args):
        calls.append(1)
        return expert_matmul(*args, interpret=True)

    monkeypatch.setattr(moe, "expert_matmul_usable", lambda *a, **k: True)
    monkeypatch.setattr(moe, "expert_matmul", counted)
    return calls


@pytest.mark.parametrize("remote", [False, True])
def test_grouped_dispatch_through_the_expert_kernel_equals_dense(expert_kernel_calls, remote):
    """The grouped dispatch at a decode batch through the expert kernel against the dense path in
    float32, bf16 weights, with and without ids of remote experts."""
    from vl2_jax.kernels import MATVEC_BLOCK_K

    e, d, f, x, n = 32, 2 * MATVEC_BLOCK_K, MATVEC_BLOCK_K, 4, 8  # 32 choices of 32 experts
    xs, gate_up, down, weights, idx = bf16_problem(6, e, d, f, x, n)
    if remote:
        idx = idx.at[:, 0].set(-1).at[:3, 1].add(e)
    got = run_experts("grouped", xs, gate_up, down, weights, idx)
    assert len(expert_kernel_calls) == 2  # both projections
    assert rel_err(f32(got), dense(f32(xs), f32(gate_up), f32(down), weights, idx)) < 1e-2


def test_expert_kernel_only_where_experts_go_unchosen(expert_kernel_calls):
    """More choices than experts (9 tokens x 4 of 32): XLA's batched matmul. The same batch on a device
    holding 32 of 64 experts (expert parallelism): the kernel, since all devices' experts count."""
    xs, gate_up, down, weights, idx = bf16_problem(6, 32, 256, 128, 4, 9)
    want = outputs_grouped(xs, gate_up, down, idx)
    assert expert_kernel_calls == []
    got = outputs_grouped(xs, gate_up, down, idx, total_experts=64)
    assert len(expert_kernel_calls) == 2
    assert rel_err(f32(got), f32(want)) < 1e-2


def test_runtime_kernels_switch(monkeypatch):
    """`Runtime(kernels=False)` runs no kernel even where one is usable (here the gathered matvec faked
    usable and interpreted), with the same answer; `Runtime` refuses values it does not know."""
    from vl2_jax.config import Runtime
    from vl2_jax.errors import ConfigError
    from vl2_jax.kernels import MATVEC_BLOCK_K, gathered_matvec
    from vl2_jax.modules import moe

    calls = []
    monkeypatch.setattr(moe, "gathered_matvec_usable", lambda *a: True)
    monkeypatch.setattr(moe, "gathered_matvec", lambda *a, **k: calls.append(1) or gathered_matvec(*a, **k, interpret=True))
    e, d, f = 12, 2 * MATVEC_BLOCK_K, MATVEC_BLOCK_K
    cfg = dataclasses.replace(vl2_jax.PRESETS["test"].language, hidden_size=d, moe_intermediate_size=f,
                              n_routed_experts=e, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = jax.random.normal(jax.random.key(0), (1, 1, d)).astype(jnp.bfloat16)
    params = moe.MoE(cfg, jnp.bfloat16).init(jax.random.key(1), x)
    outs = {}
    for kernels in (True, False):
        calls.clear()
        outs[kernels] = f32(moe.MoE(cfg, jnp.bfloat16, Runtime(moe="gather", kernels=kernels)).apply(params, x))
        assert bool(calls) == kernels
    assert rel_err(outs[True], outs[False]) < 1e-2
    for bad in (dict(kernels="off"), dict(moe="fast"), dict(attention="flash")):
        with pytest.raises(ConfigError):
            Runtime(**bad)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the expert matmul kernel runs on NVIDIA GPUs")
def test_expert_matmul_kernel_on_the_gpu(monkeypatch):
    """The kernel builds and passes its self-check inside a trace, and the bf16 grouped dispatch through
    it at small's sizes (batch 8) agrees with the float32 dense path."""
    from vl2_jax import kernels

    kernels._expert_matmul_self_check.cache_clear()
    assert bool(jax.jit(lambda: jnp.array(kernels._expert_matmul_self_check()))())
    e, d, f, x, n = 64, 2048, 1408, 6, 8
    assert kernels.expert_matmul_usable(jnp.bfloat16, d, 2 * f) and kernels.expert_matmul_usable(jnp.bfloat16, f, d)
    xs, gate_up, down, weights, idx = bf16_problem(7, e, d, f, x, n)
    from vl2_jax.modules import moe

    calls = []
    monkeypatch.setattr(moe, "expert_matmul", lambda *a: calls.append(1) or kernels.expert_matmul(*a))
    got = jax.jit(run_experts, static_argnums=0)("grouped", xs, gate_up, down, weights, idx)
    assert len(calls) == 2  # both projections went through the kernel
    want = dense(f32(xs), f32(gate_up), f32(down), weights, idx)
    assert rel_err(f32(got), want) < 1e-2


@pytest.mark.parametrize("k,n", [(2048, 576), (2816, 2048), (1280, 1280)])
def test_dense_matvec_kernel_semantics(k, n):
    """The batch-1 projections' kernel call (interpreted) at the real models' sizes, with the K split its
    tiles choose (16, 11 and 10 programs per column block): one row times the weight."""
    from vl2_jax.kernels import dense_matvec, dense_matvec_tiles

    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((1, k)).astype(jnp.bfloat16)
    w = rng.standard_normal((k, n)).astype(jnp.bfloat16)
    assert k % dense_matvec_tiles(k, n)[4] == 0 and dense_matvec_tiles(k, n)[4] > 1
    got = np.asarray(dense_matvec(x, w, interpret=True))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (1, n)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_dense_matvec_only_below_the_size_xla_strength_reduces(monkeypatch):
    """The kernel takes weights under DENSE_MATVEC_MAX_WEIGHT elements (tile-divisible, 16-bit); larger
    ones (the LM head) keep XLA's dot, which runs them as cuBLAS GEMVs."""
    from vl2_jax import kernels

    monkeypatch.setattr(kernels, "gathered_matvec_usable", lambda dtype, k, n: k % 128 == 0 and n % 64 == 0)
    assert kernels.dense_matvec_usable(jnp.bfloat16, 2816, 2048)
    assert not kernels.dense_matvec_usable(jnp.bfloat16, 2048, 102400)
    assert not kernels.dense_matvec_usable(jnp.bfloat16, 2048, 100)


def test_dense_matvec_takes_quantized_weights_of_any_size(monkeypatch):
    """Quantized values go to the kernel however large (small's shared experts' 2048 x 5632, the dense
    layer's 2048 x 21888): XLA's dot would take them widened to bf16."""
    from vl2_jax import kernels

    monkeypatch.setattr(kernels, "gathered_matvec_usable",
                        lambda dtype, k, n, weight_dtype=None: k % 128 == 0 and n % 64 == 0)
    for k, n in [(2048, 5632), (2048, 21888), (2048, 102400)]:
        assert not kernels.dense_matvec_usable(jnp.bfloat16, k, n)
        assert kernels.dense_matvec_usable(jnp.bfloat16, k, n, weight_dtype=jnp.int8)
    assert not kernels.dense_matvec_usable(jnp.bfloat16, 2048, 100, weight_dtype=jnp.int8)


@pytest.mark.parametrize("impl", ["dense", "gather", "grouped", "ragged", "blocked"])
def test_tokens_left_out_of_routing_change_nothing_else(impl):
    """`MoE(x, token_valid)`: the valid tokens' outputs are those of the full layer (every dispatch); the
    others get no routed experts (the grouped dispatch then reads none of their experts)."""
    from vl2_jax.config import Runtime
    from vl2_jax.modules.moe import MoE

    cfg = vl2_jax.PRESETS["test"].language
    x = jax.random.normal(jax.random.key(3), (4, 1, cfg.hidden_size))
    module = MoE(cfg, jnp.float32, Runtime(moe=impl))
    params = module.init(jax.random.key(4), x)
    valid = jnp.asarray([[True], [False], [True], [False]])
    with jax.default_matmul_precision("highest"):
        full, masked = module.apply(params, x), module.apply(params, x, valid)
        shared = MoE(cfg, jnp.float32, Runtime(moe="dense")).apply(
            params, x, jnp.zeros_like(valid)) if impl != "gather" else None
    np.testing.assert_allclose(np.asarray(masked)[valid[:, 0]], np.asarray(full)[valid[:, 0]], rtol=1e-5, atol=1e-6)
    if shared is not None:  # left-out tokens keep only the shared experts
        np.testing.assert_allclose(np.asarray(masked)[~valid[:, 0]], np.asarray(shared)[~valid[:, 0]],
                                   rtol=1e-5, atol=1e-6)
