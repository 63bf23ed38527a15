"""Weight-only int8/fp8 quantization (`vl2_jax.quant`): a quantized model computes what a float model
holding the dequantized weights computes (float32, logits within 1e-5 of the largest), through every MoE
dispatch and, interpreted, every kernel that takes (values, scales); converted checkpoints round-trip;
the loaded weights take the bytes the format says; the partition rules place values and scales."""

from __future__ import annotations

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ckpt_dir, load_case, open_images

import vl2_jax
from convert.__main__ import main as convert_main
from vl2_jax import Runtime
from vl2_jax.checkpoint import param_shapes
from vl2_jax.errors import ConfigError
from vl2_jax.model import VL2Model
from vl2_jax.quant import (
    QTYPES,
    as_qarray,
    dequantize,
    dequantize_params,
    quantize,
    quantize_params,
    quantized_axes,
    quantized_shapes,
    weight_bytes,
)
from vl2_jax.sharding import param_logical_axes

TOL = 1e-5  # float32, relative to the largest logit: only the order of the float32 sums differs


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@functools.cache
def float_model(variant: str) -> VL2Model:
    return vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")


@functools.cache
def batch(variant: str):
    m, case = float_model(variant), load_case(variant, "text_only")
    return m.processor.batchify([m.processor(case["conversation"], open_images(case))])


@functools.cache
def float_logits(variant: str) -> np.ndarray:
    return np.asarray(float_model(variant).logits(batch(variant)))


@functools.cache
def dequantized_logits(variant: str, quant: str) -> np.ndarray:
    """The plain path's logits of the float model whose weights are the quantized ones, dequantized."""
    m = float_model(variant)
    params = dequantize_params(quantize_params(m.params, quant))
    return np.asarray(VL2Model(m.cfg, params, m.processor, jnp.float32, Runtime.plain()).logits(batch(variant)))


# Each dispatch on each attention variant, int8 and fp8 in turn; MLA with "xla" attention also runs
# the expanded keys (`wk_b` contracted on its scaled axis: dequantized first).
MODEL_CASES = [
    ("mha", "int8", "dense", "plain"), ("mha", "fp8", "gather", "plain"),
    ("mha", "int8", "grouped", "plain"), ("mha", "fp8", "ragged", "plain"),
    ("mla", "fp8", "dense", "plain"), ("mla", "int8", "gather", "plain"),
    ("mla", "fp8", "grouped", "plain"), ("mla", "int8", "ragged", "xla"),
]


@pytest.mark.parametrize("variant,quant,moe,attention", MODEL_CASES)
def test_quantized_model_equals_dequantized_float_model(variant, quant, moe, attention):
    m = float_model(variant)
    q = VL2Model(m.cfg, quantize_params(m.params, quant), m.processor, jnp.float32,
                 Runtime(moe=moe, attention=attention, kernels=False), quant=quant)
    want = dequantized_logits(variant, quant)
    assert rel_err(q.logits(batch(variant)), want) < TOL
    assert rel_err(want, float_logits(variant)) > 1e-4  # the quantization is really there


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_bfloat16_quantized_model_runs_on_the_cpu_near_its_float32_logits(variant):
    """XLA's CPU runtime has no batched bfloat16 x bfloat16 -> float32 product (MLA's absorbed keys):
    in bfloat16 the CPU computes those products in float32."""
    q = vl2_jax.load_model(str(ckpt_dir(variant)), "bfloat16", quant="int8", runtime=Runtime(kernels=False))
    logits = np.asarray(q.logits(batch(variant))).astype(np.float32)
    assert rel_err(logits, dequantized_logits(variant, "int8")) < 0.05


def moe_problem(e, d, f, x, n, seed=5):
    k = jax.random.split(jax.random.key(seed), 4)
    xs = jax.random.normal(k[0], (n, d))
    gate_up = jax.random.normal(k[1], (e, d, 2, f)) / d**0.5
    down = jax.random.normal(k[2], (e, f, d)) / f**0.5
    weights, idx = jax.lax.top_k(jax.nn.softmax(jax.random.normal(k[3], (n, e))), x)
    return xs, gate_up, down, weights, idx.astype(jnp.int32)


def quantized_experts(gate_up, down, quant):
    return (as_qarray(quantize(gate_up, quant, (1,))), as_qarray(quantize(down, quant, (1,))))


def dense_reference(xs, gate_up_q, down_q, weights, idx):
    from vl2_jax.modules.moe import run_experts

    return run_experts("dense", xs, dequantize(gate_up_q), dequantize(down_q), weights, idx)


@pytest.mark.parametrize("impl,quant", [("dense", "int8"), ("gather", "fp8"), ("grouped", "int8"), ("ragged", "fp8")])
def test_every_dispatch_takes_quantized_experts(impl, quant):
    """Quantized experts through each XLA dispatch equal the dense path over their dequantized values,
    ids of remote experts (out of range) included."""
    from vl2_jax.modules.moe import run_experts

    xs, gate_up, down, weights, idx = moe_problem(e=16, d=24, f=20, x=4, n=40)
    idx = idx.at[:3, 0].set(-2).at[3:6, 1].add(16)
    gu, dw = quantized_experts(gate_up, down, quant)
    want = dense_reference(xs, gu, dw, weights, idx)
    assert rel_err(run_experts(impl, xs, gu, dw, weights, idx), want) < TOL


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_gather_kernel_reads_quantized_experts(monkeypatch, quant):
    """The decode kernel (interpreted) on int8/fp8 values and scales equals the dense path over the
    dequantized weights, with the kernel really called (at its quantized tiles: gate/up's K split over
    two programs, whose sums the scales multiply after the kernel)."""
    from vl2_jax.kernels import gathered_matvec, matvec_tiles
    from vl2_jax.modules import moe

    calls = []
    monkeypatch.setattr(moe, "gathered_matvec_usable", lambda *a, **k: bool(k))  # only quantized calls here
    monkeypatch.setattr(moe, "gathered_matvec", lambda *a, **k: calls.append(k) or gathered_matvec(*a, **k, interpret=True))
    xs, gate_up, down, weights, idx = moe_problem(e=6, d=256, f=128, x=2, n=1)
    assert matvec_tiles(256, 256, quantized=True)[4] == 2
    gu, dw = quantized_experts(gate_up, down, quant)
    got = moe.run_experts("gather", xs, gu, dw, weights, idx, ids_in_range=True)
    assert len(calls) == 2 and all(k["scales_EN"] is not None for k in calls)
    assert rel_err(got, dense_reference(xs, gu, dw, weights, idx)) < TOL


@pytest.mark.parametrize("quant", ["fp8"])
def test_expert_kernel_reads_quantized_experts(monkeypatch, quant):
    """The decode-batch expert kernel (interpreted) on values and scales, experts no token chose
    included, equals the dense path over the dequantized weights."""
    from vl2_jax.kernels import expert_matmul
    from vl2_jax.modules import moe

    calls = []
    monkeypatch.setattr(moe, "expert_matmul_usable", lambda *a, **k: "weight_dtype" in k)
    monkeypatch.setattr(moe, "expert_matmul", lambda *a, **k: calls.append(k) or expert_matmul(*a, **k, interpret=True))
    xs, gate_up, down, weights, idx = moe_problem(e=5, d=128, f=128, x=2, n=2)
    gu, dw = quantized_experts(gate_up, down, quant)
    got = moe.run_experts("grouped", xs, gu, dw, weights, idx)
    assert len(calls) == 2 and all(k["scales_EN"] is not None for k in calls)
    assert rel_err(got, dense_reference(xs, gu, dw, weights, idx)) < TOL


def test_blocked_kernel_semantics():
    """Prefill's quantized-expert kernel (interpreted): each block's rows times its expert's values and
    scales, several blocks of one expert, an expert with none, several column and K blocks; bad row
    counts refused."""
    from vl2_jax.kernels import BLOCKED_TILES, blocked_matmul

    rng = np.random.default_rng(8)
    block_n, block_k = BLOCKED_TILES[:2]
    e, m, k, n = 3, 32, 3 * block_k, 2 * block_n
    values = quantize(jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32), "int8", (1,))
    q = as_qarray(values)
    expert, used = np.array([2, 2, 0, 1, 1], np.int32), np.array([1, 1, 1, 0, 0], np.int32)
    xs = rng.standard_normal((len(expert), m, k)).astype(np.float32)
    got = np.asarray(blocked_matmul(xs, q.qvalue, q.scale.reshape(e, n), expert, used, interpret=True))
    want = np.einsum("zmk,zkn->zmn", xs, np.asarray(dequantize(values))[expert])
    assert got.dtype == np.float32 and got.shape == (5, m, n)
    assert rel_err(got[:3], want[:3]) < TOL
    with pytest.raises(ValueError, match="power of two"):
        blocked_matmul(xs[:, :24], q.qvalue, q.scale.reshape(e, n), expert, used, interpret=True)


@pytest.mark.parametrize("quant,remote", [("int8", False), ("fp8", True)])
def test_prefill_reads_quantized_experts_through_the_blocked_kernel(monkeypatch, quant, remote):
    """At a prefill's token count "auto" picks the blocked dispatch for quantized experts where its
    kernel runs (as on a GPU; interpreted here), which then equals the dense path over the dequantized
    weights, with the kernel really called for both projections; ids of remote experts give zeros."""
    from vl2_jax.kernels import blocked_matmul
    from vl2_jax.modules import moe

    calls = []
    monkeypatch.setattr(moe, "blocked_matmul_usable", lambda *a, **k: True)
    monkeypatch.setattr(moe, "blocked_matmul", lambda *a: calls.append(a[1].dtype) or blocked_matmul(*a, interpret=True))
    xs, gate_up, down, weights, idx = moe_problem(e=8, d=128, f=128, x=2, n=96)
    if remote:
        idx = idx.at[:5, 0].set(-1).at[5:9, 1].add(8)
    gu, dw = quantized_experts(gate_up, down, quant)
    impl = moe.choose_dispatch("auto", 96, 2, gu, use_kernel=True, dtype=jnp.float32)
    assert impl == "blocked" and moe.choose_dispatch("auto", 96, 2, gate_up, use_kernel=True) != "blocked"
    got = moe.run_experts(impl, xs, gu, dw, weights, idx, use_kernel=True)
    assert calls == [gu.qvalue.dtype] * 2
    assert rel_err(got, dense_reference(xs, gu, dw, weights, idx)) < TOL
    assert rel_err(moe.run_experts(impl, xs, gu, dw, weights, idx, use_kernel=False),
                   dense_reference(xs, gu, dw, weights, idx)) < TOL and len(calls) == 2


def test_blocked_kernel_runs_per_device_under_a_mesh(monkeypatch):
    """Experts and their width split over 4 devices: each device's shard_map runs the kernel (interpreted)
    on its own experts' values and scales, and the all-reduced result equals one device's dense path."""
    from vl2_jax.kernels import blocked_matmul
    from vl2_jax.modules import moe
    from vl2_jax.sharding import make_mesh

    calls = []
    monkeypatch.setattr(moe, "blocked_matmul_usable", lambda *a, **k: True)
    monkeypatch.setattr(moe, "blocked_matmul", lambda *a: calls.append(a[1].shape) or blocked_matmul(*a, interpret=True))
    xs, gate_up, down, weights, idx = moe_problem(e=8, d=128, f=256, x=2, n=80)
    gu, dw = quantized_experts(gate_up, down, "int8")
    with jax.set_mesh(make_mesh("expert=2,tensor=2", vl2_jax.PRESETS["test"], jax.devices()[:4])):
        impl = moe.choose_dispatch("auto", 80, 2, gu, dtype=jnp.float32)
        got = moe.experts_sharded(impl, xs, gu, dw, weights, idx)
    assert impl == "blocked" and calls == [(4, 128, 256), (4, 128, 128)]  # 4 experts, half the width, a device
    assert rel_err(got, dense_reference(xs, gu, dw, weights, idx)) < TOL


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the blocked matmul kernel runs on NVIDIA GPUs")
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_blocked_kernel_on_the_gpu(quant):
    """The kernel builds and passes its self-check inside a trace, "auto" picks it at a prefill of small's
    sizes, and the bf16 dispatch through it agrees with the float32 dense path over the dequantized
    weights as closely as the grouped matmul over their bf16 copy does."""
    from vl2_jax import kernels
    from vl2_jax.modules import moe

    assert bool(jax.jit(lambda: jnp.array(kernels._blocked_matmul_self_check(jnp.dtype(QTYPES[quant]).name)))())
    e, d, f, x, n = 64, 2048, 1408, 6, 512
    xs, gate_up, down, weights, idx = moe_problem(e, d, f, x, n)
    gu, dw = quantized_experts(gate_up, down, quant)
    assert moe.choose_dispatch("auto", n, x, gu, dtype=jnp.bfloat16) == "blocked"
    want = dense_reference(xs, gu, dw, weights, idx)
    run = jax.jit(functools.partial(moe.run_experts, use_kernel=True), static_argnums=0)
    got = {impl: run(impl, xs.astype(jnp.bfloat16), gu, dw, weights, idx) for impl in ("blocked", "ragged")}
    assert rel_err(got["blocked"], want) < 1.5 * rel_err(got["ragged"], want) + 1e-3


@pytest.mark.parametrize("spec,x_shape,w_shape,contracted", [
    ("BTHU,HUD->BTD", (1, 1, 2, 128), (2, 128, 192), (0, 1)),  # contracts two axes: o_w
    ("BTD,DWGK->WBTGK", (1, 1, 128), (128, 2, 2, 32), (0,)),  # output axes reordered: MHA's kv_w
])
def test_one_row_projection_kernel_reads_quantized_weights(monkeypatch, spec, x_shape, w_shape, contracted):
    """`layers.project` hands one row times a quantized weight to the matrix-vector kernel (interpreted)
    as values and per-output-channel scales; the result equals the einsum over the dequantized weight."""
    from vl2_jax import kernels
    from vl2_jax.modules import layers

    calls = []

    def interpreted(x, w, scales_N=None, out_dtype=jnp.float32):
        calls.append(scales_N is not None)
        return kernels.dense_matvec(x, w, interpret=True, scales_N=scales_N, out_dtype=out_dtype)

    monkeypatch.setattr(layers, "dense_matvec_usable", lambda *a, **k: "weight_dtype" in k)
    monkeypatch.setattr(layers, "dense_matvec", interpreted)
    k = jax.random.split(jax.random.key(3), 2)
    x, w = jax.random.normal(k[0], x_shape), jax.random.normal(k[1], w_shape)
    for quant in ("int8", "fp8"):
        wq = as_qarray(quantize(w, quant, contracted))
        got = layers.project(spec, x, wq, use_kernel=True)
        want = jnp.einsum(spec, x, dequantize(wq), precision="highest")
        assert rel_err(got, want) < TOL
    assert calls == [True, True]


def test_quantized_format_and_weight_bytes():
    """A loaded quantized test model holds int8 (fp8) values where the rules say, float32 scales of one
    per output channel, everything else float as loaded: its bytes are exactly those of the format."""
    cfg = float_model("mla").cfg
    floats = param_shapes(cfg, jnp.float32)
    for quant, qdtype in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
        m = vl2_jax.load_model(str(ckpt_dir("mla")), "float32", quant=quant)
        assert m.quant == quant
        want, quantized = 0, 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(floats)[0]:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            node = m.params
            for key in name.split("/"):
                node = node[key]
            axes = quantized_axes(name, len(leaf.shape))
            n = math.prod(leaf.shape)
            if axes is None:
                assert node.dtype == jnp.float32 and node.shape == leaf.shape
                want += 4 * n
                continue
            quantized += 1
            scale_shape = tuple(1 if a in axes else s for a, s in enumerate(leaf.shape))
            assert node["qvalue"].dtype == qdtype and node["qvalue"].shape == leaf.shape
            assert node["scale"].dtype == jnp.float32 and node["scale"].shape == scale_shape
            want += n + 4 * math.prod(scale_shape)
        # 3 layers of MLA attention (q_w, kv_a_w, wk_b, wv_b, o_w), layer 0's dense MLP, then two MoE
        # layers' routed and shared experts
        assert quantized == 3 * 5 + 2 + 2 * 4
        assert weight_bytes(m.params) == want
        assert sum(a.nbytes for a in jax.tree.leaves(m.params)) == want  # the device buffers themselves
    lm = m.params["params"]["language"]
    assert "router_w" in lm["layers_1"]["mlp"] and lm["layers_1"]["mlp"]["router_w"].dtype == jnp.float32
    assert lm["embed"].dtype == jnp.float32 and lm["lm_head"].dtype == jnp.float32


@pytest.mark.parametrize("mesh", [None, "data=2,expert=2,tensor=2"])
def test_random_model_is_quantized_leaf_by_leaf_as_drawn(mesh):
    """`random:*` with a quant quantizes each weight as it is drawn (so a float copy of the whole model
    never exists): the same values and scales as quantizing the whole drawn float tree, placed by the
    partition rules under a mesh."""
    from vl2_jax.load import init_params
    from vl2_jax.quant import quantize_params

    m = vl2_jax.load_model("random:test", "float32", quant="int8", mesh=mesh)
    want = quantize_params(init_params(m.cfg, jnp.float32, 0), "int8")
    assert jax.tree.structure(m.params) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
        assert got.dtype == ref.dtype and np.array_equal(np.asarray(got), np.asarray(ref))
    if mesh is not None:
        values = m.params["params"]["language"]["layers_1"]["mlp"]["gate_up_w"]["qvalue"]
        assert len(values.sharding.device_set) > 1


def test_partition_rules_place_values_and_scales():
    """Values take their weight's axes; scales the same, unsplit where they are 1 (contracted)."""
    assert param_logical_axes("params/language/layers_1/mlp/down_w/qvalue", 3) == ("experts", "mlp", None)
    assert param_logical_axes("params/language/layers_1/mlp/down_w/scale", 3) == ("experts", None, None)
    assert param_logical_axes("params/language/layers_1/mlp/gate_up_w/scale", 4) == ("experts", None, None, "mlp")
    assert param_logical_axes("params/language/layers_0/attn/o_w/scale", 3) == (None, None, None)
    assert param_logical_axes("params/language/layers_0/attn_norm/scale", 1) == (None,)  # a norm, not a scale
    shapes = quantized_shapes(param_shapes(float_model("mha").cfg, jnp.float32), "fp8", lm_head=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:  # every leaf has a rule of its rank
        assert len(param_logical_axes(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.ndim)) == leaf.ndim


def test_convert_quant_round_trips(tmp_path, capsys):
    """`python -m convert --quant int8` writes the quantized leaves and records the format; both readers
    give back exactly what quantizing at load gives; loading it as another format is one clear error."""
    from vl2_jax import orbax_io

    dst = tmp_path / "q8"
    assert convert_main([str(ckpt_dir("mha")), str(dst), "--quant", "int8", "--dtype", "float32"]) == 0
    assert "int8" in capsys.readouterr().out
    assert json.loads((dst / orbax_io.MANIFEST).read_text())["quant"] == "int8"
    assert orbax_io.saved_quant(dst) == "int8"
    loaded = vl2_jax.load_model(str(dst), "float32")
    said = []
    at_load = vl2_jax.load_model(str(ckpt_dir("mha")), "float32", quant="int8", progress=said.append)
    assert loaded.quant == "int8"
    # the line that ends the load says what was read (float32) and what the devices hold (int8: less)
    pattern = r"\(([\d.]+) MB of weights, .*; ([\d.]+) MB on the devices, the language model's in int8\)$"
    read, held = (float(n) for n in re.search(pattern, said[-1]).groups())
    assert held == pytest.approx(weight_bytes(at_load.params) / 1e6, abs=0.01) and held < read, said[-1]
    assert jax.tree.structure(loaded.params) == jax.tree.structure(at_load.params)
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(at_load.params)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    plain, _ = orbax_io.restore(dst, loaded.cfg, "float32", reader="orbax")
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(loaded.params)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ConfigError, match=r"holds int8 weights.*leave --quant \(in Python, quant=\) out or set it to int8.*again with --quant fp8"):
        vl2_jax.load_model(str(dst), "float32", quant="fp8")
    with pytest.raises(ConfigError, match="holds int8 weights.*again without --quant"):
        vl2_jax.load_model(str(dst), "float32", quant="none")
    assert convert_main([str(dst), str(tmp_path / "again")]) == 1
    assert "is already a `python -m convert` output" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown quantization"):
        vl2_jax.load_model("random:test", quant="int4")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the failure path where the kernels cannot build")
def test_quantized_kernel_self_checks(monkeypatch):
    """The kernels' self-checks on int8 and fp8 weights: where Triton cannot lower (the CPU) they warn
    and say no, so quantized weights take XLA's path; with the kernels' semantics (interpreted) yes."""
    from vl2_jax import kernels

    kernels._quantized_self_check.cache_clear()
    with pytest.warns(UserWarning, match="on int8 weights failed its self-check"):
        assert not kernels._quantized_self_check("gathered_matvec", "int8")
    kernels._blocked_matmul_self_check.cache_clear()
    with pytest.warns(UserWarning, match="blocked matmul kernel on int8 weights failed its self-check"):
        assert not kernels._blocked_matmul_self_check("int8")
    for name in ("gathered_matvec", "expert_matmul", "blocked_matmul"):
        monkeypatch.setattr(kernels, name, jax.jit(functools.partial(getattr(kernels, name), interpret=True),
                                                   static_argnums=(3,) if name == "gathered_matvec" else ()))
    kernels._quantized_self_check.cache_clear()
    kernels._blocked_matmul_self_check.cache_clear()
    assert kernels._quantized_self_check("gathered_matvec", "float8_e4m3fn")
    assert kernels._quantized_self_check("expert_matmul", "int8")
    assert kernels._blocked_matmul_self_check("int8") and kernels._blocked_matmul_self_check("float8_e4m3fn")
    kernels._quantized_self_check.cache_clear()
    kernels._blocked_matmul_self_check.cache_clear()
