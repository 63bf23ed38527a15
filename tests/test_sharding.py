"""Sharding on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS): parity with one device, a
pinned snapshot of every PartitionSpec, and two processes joined by jax.distributed."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import vl2_jax
from tests.conftest import FIXTURES, VARIANTS, ckpt_dir, free_ports, load_case, open_images
from vl2_jax import Runtime
from vl2_jax.cache import KVCache
from vl2_jax.checkpoint import param_shapes
from vl2_jax.errors import ConfigError
from vl2_jax.quant import quantized_shapes
from vl2_jax.sharding import Layout, auto_mesh_shape, make_mesh, param_logical_axes

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("expert=8", "tensor=8", "data=2,expert=2,tensor=2")
SNAPSHOT = ROOT / "tests" / "data" / "partition_specs.txt"
NAMES = ("two_images", "text_only")  # a batch of two, so data=2 really splits it


@functools.cache
def single(variant):
    return vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32")


def batch_for(m, variant):
    outs = []
    for name in NAMES:
        case = load_case(variant, name)
        outs.append(m.processor(case["conversation"], open_images(case)))
    return m.processor.batchify(outs)


@functools.cache
def reference(variant):
    m = single(variant)
    b = batch_for(m, variant)
    return np.asarray(m.logits(b)), m.generate(b, max_new_tokens=10).token_ids


def test_eight_devices_are_visible():
    assert len(jax.devices()) == 8


# Each layout once, each variant once (MHA's heads over tensor, MLA's experts over expert, noaux_tc's
# routing over all three axes): every pairing would be 9 loads of sharded programs for little more.
@pytest.mark.parametrize("variant,layout", list(zip(VARIANTS, ("tensor=8", "expert=8", "data=2,expert=2,tensor=2"))))
def test_sharded_logits_and_greedy_equal_unsharded(variant, layout):
    logits, greedy = reference(variant)
    m = vl2_jax.load_pretrained(ckpt_dir(variant), dtype="float32", mesh=layout)
    b = batch_for(m, variant)
    got = np.asarray(m.logits(b))
    assert np.abs(got - logits).max() / np.abs(logits).max() < 1e-5
    assert m.generate(b, max_new_tokens=10).token_ids == greedy
    # The weights really are split: an expert or tensor axis > 1 leaves no device with a whole MoE layer.
    experts = m.params["params"]["language"]["layers_1"]["mlp"]["gate_up_w"]
    assert len({s.data.shape for s in experts.addressable_shards}) == 1
    assert experts.addressable_shards[0].data.size < experts.size


@pytest.mark.parametrize("layout", [None, "data=2,expert=2,tensor=2"])
def test_put_many_places_as_put_does(layout):
    """Several host arrays in one transfer call: the values and shardings of `put`, array by array."""
    m = single(VARIANTS[0]) if layout is None else vl2_jax.load_pretrained(ckpt_dir(VARIANTS[0]), mesh=layout)
    host = [(np.arange(8 * 6, dtype=np.int32).reshape(8, 6), ("batch", None)),
            (np.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4), (None, None, None, None))]
    for got, want, (array, _) in zip(m.put_many(*host), [m.put(*pair) for pair in host], host, strict=True):
        np.testing.assert_array_equal(np.asarray(got), array)
        assert got.sharding.is_equivalent_to(want.sharding, array.ndim)


def test_models_on_disjoint_meshes_generate_in_turn():
    """Nothing of one model's mesh stays behind for the next model's generation (a cached PRNG key
    once did): two models on disjoint halves of the devices sample the same tokens for one seed."""
    variant = VARIANTS[0]
    cfg = single(variant).cfg
    answers = []
    for devices in (jax.devices()[:4], jax.devices()[4:]):
        m = vl2_jax.load_pretrained(ckpt_dir(variant), mesh=make_mesh("expert=4", cfg, devices))
        answers.append(m.generate(batch_for(m, variant), max_new_tokens=6, temperature=0.8, seed=3).token_ids)
    assert answers[0] == answers[1]


def specs_text() -> str:
    """One line per parameter and cache leaf: preset, layout, path, PartitionSpec."""
    lines = []
    for preset in ("tiny", "test"):  # MHA with 10 heads; MLA with query LoRA and grouped routing
        cfg = vl2_jax.PRESETS[preset]
        for layout in (*LAYOUTS, "expert=2,tensor=4"):
            lay = Layout(make_mesh(layout, cfg))
            specs = lay.param_specs(param_shapes(cfg, np.float32))
            cache = jax.eval_shape(functools.partial(KVCache.zeros, cfg.language, 2, 64, np.float32))
            for tree, prefix in ((specs, ""), (lay.cache_specs(cache), "cache/")):
                for path, spec in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(
                        x, jax.sharding.PartitionSpec))[0]:
                    name = jax.tree_util.keystr(path, simple=True, separator="/")
                    lines.append(f"{preset} {layout} {prefix}{name} {tuple(spec)}")
            # quantized weights (int8 and fp8 share the layout): values and scales, LM head included
            shapes = quantized_shapes(param_shapes(cfg, np.float32), "int8", lm_head=True)
            for path, spec in jax.tree_util.tree_flatten_with_path(lay.param_specs(shapes), is_leaf=lambda x: isinstance(
                    x, jax.sharding.PartitionSpec))[0]:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                if name.endswith(("/qvalue", "/scale")) and not name.endswith("norm/scale"):
                    lines.append(f"{preset} {layout} quantized/{name} {tuple(spec)}")
    return "\n".join(lines) + "\n"


def test_partition_specs_match_snapshot():
    """A sharding change must show up as a reviewed diff of tests/data/partition_specs.txt
    (regenerate with UPDATE_SNAPSHOTS=1)."""
    text = specs_text()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text()


def test_rules_refuse_unknown_parameters_and_bad_meshes():
    with pytest.raises(ConfigError, match="no partition rule"):
        param_logical_axes("language/layers_1/mlp/mystery_w", 2)
    cfg = vl2_jax.PRESETS["tiny"]
    with pytest.raises(ConfigError, match="needs 6 devices but 8"):
        make_mesh("expert=3,tensor=2", cfg)
    with pytest.raises(ConfigError, match="bad mesh spec"):
        make_mesh("experts=8", cfg)
    with pytest.raises(ConfigError, match="axis expert is given twice"):
        make_mesh("expert=2,expert=2", cfg)


def test_auto_mesh_and_undividable_heads():
    assert auto_mesh_shape(vl2_jax.PRESETS["tiny"], 8) == {"data": 1, "expert": 8, "tensor": 1}
    assert auto_mesh_shape(vl2_jax.PRESETS["base"], 16) == {"data": 1, "expert": 8, "tensor": 2}
    cfg = vl2_jax.PRESETS["tiny"]  # 10 heads cannot split 4 ways: replicated, the MLP is still split
    lay = Layout(make_mesh("expert=2,tensor=4", cfg))
    specs = lay.param_specs(param_shapes(cfg, np.float32))["params"]["language"]["layers_1"]
    assert tuple(specs["attn"]["q_w"]) == (None, None, None)
    assert tuple(specs["mlp"]["gate_up_w"]) == ("expert", None, None, "tensor")
    assert any("heads (10) does not divide by tensor=4" in n for n in lay.notes)
    heads, kv_heads = lay.summary()  # one line per cause, every layer's leaves folded into layers_*
    assert heads == ("heads (10) does not divide by tensor=4, so these stay whole on every device: "
                     "params/language/layers_*/attn/o_w, params/language/layers_*/attn/q_w")
    assert kv_heads.startswith("kv_heads (10) does not divide by tensor=4") and "layers_1" not in kv_heads


def test_two_processes_give_the_single_process_answer():
    """Two processes on one machine (one CPU device each, gloo over loopback) share one generation."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = [sys.executable, "-m", "generate", "--model", str(ckpt_dir("mla")), "--dtype", "float32", "--json",
            "--max-new-tokens", "6", "--image", str(FIXTURES / "images" / "noise_wide.png"),
            "--prompt", "What is in the picture?"]
    (port,) = free_ports(1, "localhost")
    procs = [subprocess.Popen([*args, "--mesh", "expert=2", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    one = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    answer = lambda out: json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert answer(outs[0][0])["token_ids"] == answer(one.stdout)["token_ids"]
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # only process 0 prints


def test_moe_runs_expert_parallel_under_a_mesh():
    """Under a mesh the routed experts run per device in a shard_map (local experts, one all-reduce),
    for every local dispatch, and equal the single-device result."""
    import jax.numpy as jnp

    from vl2_jax.modules.moe import MoE

    m = single("mla_noaux")
    params = {"params": m.params["params"]["language"]["layers_1"]["mlp"]}
    x = jax.random.normal(jax.random.key(0), (2, 40, m.cfg.language.hidden_size))  # grouped: capacity < tokens
    mesh = make_mesh("expert=2,tensor=4", m.cfg)
    for impl in ("dense", "gather", "grouped", "ragged", "blocked"):
        module = MoE(m.cfg.language, jnp.float32, Runtime(moe=impl))
        want = np.asarray(module.apply(params, x))
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(module.apply)(params, x))
            got = np.asarray(jax.jit(module.apply)(params, x))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, impl


def test_expert_parallel_moe_is_bitwise_equal_in_bfloat16():
    """With the experts split alone, each (token, choice) output comes from one device, the all-reduce adds
    zeros only and the weighted sum runs as on one device: bf16 results are identical, not just close.
    (A tensor split cuts the expert width, so its partial sums do round differently.)"""
    import jax.numpy as jnp

    from vl2_jax.modules.moe import MoE

    m = single("mla_noaux")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), {"params": m.params["params"]["language"]["layers_1"]["mlp"]})
    for tokens in (1, 40):  # decode (no capacity check) and prefill-sized (grouped with its overflow check)
        x = jax.random.normal(jax.random.key(tokens), (2, tokens, m.cfg.language.hidden_size)).astype(jnp.bfloat16)
        for impl in ("dense", "gather", "grouped", "ragged", "blocked"):
            module = MoE(m.cfg.language, jnp.bfloat16, Runtime(moe=impl))
            want = np.asarray(jax.jit(module.apply)(params, x).astype(jnp.float32))
            for layout in ("data=4,expert=2", "expert=8"):
                with jax.set_mesh(make_mesh(layout, m.cfg)):
                    got = np.asarray(jax.jit(module.apply)(params, x).astype(jnp.float32))
                np.testing.assert_array_equal(got, want, err_msg=f"{impl} {layout} {tokens} tokens")
