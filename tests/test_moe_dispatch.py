"""Every MoE dispatch against the plain dense path on random arrays, including the grouped dispatch's
capacity overflow and the out-of-range expert ids that expert parallelism passes for remote experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vl2_jax.modules.moe import combine, grouped_capacity, outputs_grouped, run_experts

E, D, F, N, X = 16, 24, 20, 80, 4
FAST = ("gather", "grouped", "ragged")


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


def test_grouped_capacity():
    assert grouped_capacity(1, 6, 64) == 1  # never more rows than tokens
    assert grouped_capacity(32, 6, 64) == 32  # decode batches: no overflow check
    assert grouped_capacity(1088, 6, 64) == 208  # 2 x 102 tokens, rounded up to a multiple of 8
    assert np.all([grouped_capacity(n, 6, 64) <= n for n in range(1, 300)])
