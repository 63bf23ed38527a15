"""The decode attention kernel (`kernels.decode_attention`, run by Pallas's interpreter on any backend):
each row's keys up to its own length, read in place from whole cache rows, equal to a float32 softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vl2_jax.kernels import DECODE_BLOCK_K, decode_attention, decode_attention_reference, decode_splits


def cache(rng, lengths, b, s, *dims):
    """[b, s, *dims] float32 with NaN in every entry past each row's length and in rows past the queried
    ones: the kernel must read none of them."""
    a = rng.standard_normal((b, s, *dims)).astype(np.float32)
    a[len(lengths):] = np.nan
    for row, n in enumerate(lengths):
        a[row, n:] = np.nan
    return a


@pytest.mark.parametrize("form", ["mha", "grouped", "mla"])
@pytest.mark.parametrize("splits", [1, 2, 16])
def test_each_row_attends_to_its_own_keys_alone(form, splits):
    rng = np.random.default_rng(0)
    s = 3 * DECODE_BLOCK_K
    lengths = np.array([1, DECODE_BLOCK_K - 1, DECODE_BLOCK_K, DECODE_BLOCK_K + 1, s, 100], np.int32)
    n, b = len(lengths), len(lengths) + 2
    q = lambda *shape: rng.standard_normal((n, *shape)).astype(np.float32)
    if form == "mla":  # two key parts, the values the first (the latent), one key head
        q_parts, k_parts, v = (q(1, 4, 32), q(1, 4, 8)), (cache(rng, lengths, b, s, 1, 32), cache(rng, lengths, b, s, 1, 8)), None
    else:
        m = 1 if form == "mha" else 2
        q_parts, k_parts, v = (q(3, m, 16),), (cache(rng, lengths, b, s, 3, 16),), cache(rng, lengths, b, s, 3, 8)
    got = np.asarray(decode_attention(q_parts, k_parts, v, lengths, 0.3, splits=splits, interpret=True))
    clean = lambda a: None if a is None else np.nan_to_num(a, nan=0.0)
    want = decode_attention_reference(q_parts, tuple(map(clean, k_parts)), clean(v), lengths, 0.3)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_splits_fill_the_gpu_and_keys_must_fill_whole_blocks():
    assert [decode_splits(p) for p in (1, 10, 80, 640)] == [16, 16, 4, 1]
    q, k = np.zeros((1, 1, 1, 16), np.float32), np.zeros((1, DECODE_BLOCK_K + 8, 1, 16), np.float32)
    with pytest.raises(ValueError, match="multiple of"):
        decode_attention((q,), (k,), k, np.array([1], np.int32), 1.0, interpret=True)


@pytest.mark.parametrize("form", [(1, (32,), 16), (16, (32, 16), None)])
def test_self_check_passes_the_kernel_s_semantics_and_fails_a_kernel_that_stops_early(form, monkeypatch):
    """The self-check at given head sizes (MHA's form; MLA's, the values the first key part) says yes to
    the kernel's semantics (interpreted in place of the compiled kernel), and no to a kernel that reads
    only its first block of keys where one program walks a whole row (a running softmax never rescaled)."""
    from vl2_jax import kernels

    kernel = kernels.decode_attention

    def interpreted(q_parts, k_parts, v, lengths, scale, splits=None):
        return kernel(q_parts, k_parts, v, lengths, scale, splits, interpret=True)

    def first_block_only(q_parts, k_parts, v, lengths, scale, splits=None):
        if splits == 1:
            lengths = jnp.minimum(lengths, DECODE_BLOCK_K)
        return interpreted(q_parts, k_parts, v, lengths, scale, splits)

    monkeypatch.setattr(kernels, "decode_attention", jax.jit(interpreted, static_argnums=(4, 5)))
    assert kernels._decode_attention_self_check.__wrapped__("bfloat16", *form)
    monkeypatch.setattr(kernels, "decode_attention", jax.jit(first_block_only, static_argnums=(4, 5)))
    with pytest.warns(UserWarning, match="relative error"):
        assert not kernels._decode_attention_self_check.__wrapped__("bfloat16", *form)
