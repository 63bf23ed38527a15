"""Layer-level float32 parity with independent numpy (float64) references of the official PyTorch code.

Every reference below works on random weights in the PyTorch `[out, in]` layout, used as the reference code
uses them (`x @ W.T`, `.reshape(b, t, h, d)`, `kv_b_proj.view(h, -1, r)`, `F.unfold` channel order), and our
module runs on the parameters that our converter rules (`conversion_plan` + `apply_rule`) make from the same
tensors. So each test pins one layer together with its conversion rules, and a failure names the layer.
Sizes are small and distinct so that a swapped axis fails; positions are offset and irregular so that a RoPE
indexing bug fails.

Tolerance: max |ours - reference| <= TOL * max |reference| (float32 against float64).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vl2_jax.checkpoint import apply_rule, conversion_plan, set_path
from vl2_jax.config import PRESETS, Runtime, VL2Config
from vl2_jax.errors import InputError
from vl2_jax.modules.attention import MHAttention, MLAttention
from vl2_jax.modules.language import DecoderLayer
from vl2_jax.modules.layers import RMSNorm, apply_rope, apply_rope_interleaved, rope_cos_sin
from vl2_jax.modules.moe import MLP, MoE, route
from vl2_jax.modules.projector import Projector
from vl2_jax.modules.vision import VisionBlock, VisionTransformer
from vl2_jax.modules.vl2 import VL2
from vl2_jax.processor import image_token_sources

TOL = 1e-5  # float32 single ops, relative to the reference's largest magnitude (STYLE.md)

# Vision: 38 px with 7 px patches -> a 5 x 5 grid (3 px dropped by the conv; odd, so the projector pads);
# 3 heads of 14, MLP int(42 * 3.7362) = 156.
VISION = dict(image_size=38, patch_size=7, width=42, heads=3, layers=2)
# MHA with GQA: 6 query heads of 10 share 2 key/value heads.
MHA = dict(use_mla=False, hidden_size=60, num_attention_heads=6, num_key_value_heads=2, kv_lora_rank=None,
           q_lora_rank=None, qk_rope_head_dim=0, qk_nope_head_dim=0, v_head_dim=0, rope_theta=2000.0)
# MLA: 5 heads, nope 14 + rope 6, v 11, latent 17, query LoRA 23 (or none).
MLA = dict(use_mla=True, hidden_size=36, num_attention_heads=5, num_key_value_heads=5, qk_nope_head_dim=14,
           qk_rope_head_dim=6, v_head_dim=11, kv_lora_rank=17, q_lora_rank=23)
# MoE: 15 experts of width 13 in 5 groups of 3, top-4.
EXPERTS = dict(n_routed_experts=15, moe_intermediate_size=13, num_experts_per_tok=4, first_k_dense_replace=1,
               num_hidden_layers=2)


# ----------------------------------------------------------------------------------------------- helpers


def assert_close(got, want: np.ndarray, tol: float = TOL) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != reference {want.shape}"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= tol * scale, f"max |err| {err:.3g} > {tol:g} * max |ref| {scale:.3g} (rel {err / scale:.3g})"


def make_cfg(vision: dict | None = None, **language) -> VL2Config:
    """The test preset with vision/language fields replaced (projector sizes follow); validated."""
    base = PRESETS["test"]
    v = dataclasses.replace(base.vision, **(vision or {}))
    lang = dataclasses.replace(base.language, **language)
    proj = dataclasses.replace(base.projector, input_dim=v.width, n_embed=lang.hidden_size)
    cfg = VL2Config(v, proj, lang, candidate_resolutions=((v.image_size, v.image_size),))
    lang.validate()
    cfg.validate()
    return cfg


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
        x = 1.0 + 0.3 * rng.standard_normal(shape)  # LayerNorm / RMSNorm scales
    elif name.endswith("e_score_correction_bias"):
        x = rng.uniform(0.0, 0.5, shape)  # positive, so masked groups' 0.0 never wins (see test_route)
    elif len(shape) == 1 or name.endswith("pos_embed"):
        x = 0.5 * rng.standard_normal(shape)  # biases, pos_embed, image_newline, view_seperator
    elif name.endswith("embed_tokens.weight"):
        x = rng.standard_normal(shape)
    else:
        x = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))  # [out, in...]: unit-scale outputs
    return x.astype(np.float32)


def convert(cfg: VL2Config, prefix: tuple[str, ...] = (), seed: int = 0,
            scale=lambda name: 1.0) -> tuple[dict, dict]:
    """Random PyTorch-layout tensors for the rules whose targets lie under `prefix`, and our converted tree;
    `scale(name)` multiplies a tensor as it is drawn.

    Returns (state dict name -> float64 copy of the float32 tensor, our parameter sub-tree at `prefix`).
    """
    rng = np.random.default_rng(seed)
    sd, tree = {}, {}
    for rule in conversion_plan(cfg):
        if not any(path[: len(prefix)] == prefix for path, _ in rule.targets):
            continue
        for name, shape in rule.sources:
            sd[name] = _random_tensor(name, shape, rng) * np.float32(scale(name))
        for path, array in apply_rule(rule, [sd[n] for n in rule.source_names]):
            set_path(tree, path, jnp.asarray(array))
    for key in prefix:
        tree = tree[key]
    return {k: v.astype(np.float64) for k, v in sd.items()}, tree


def run(module, params: dict, *args, method=None):
    """`module.apply({"params": params}, *args)` under one `jax.jit` (one compile instead of one per op), as numpy."""
    fn = jax.jit(functools.partial(module.apply, method=method))
    return np.asarray(fn({"params": params}, *(jnp.asarray(a) for a in args)))


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# Positions [2, 7]: row 0 offset with gaps; row 1 left-padded by 2 (pads at 0, then cumsum(mask) - 1).
POSITIONS = np.array([[40, 41, 43, 47, 48, 55, 60], [0, 0, 0, 1, 2, 3, 4]], np.int32)
VALID = np.array([[True] * 7, [False, False] + [True] * 5])


def causal_mask(valid: np.ndarray) -> np.ndarray:
    t = valid.shape[1]
    return np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]


# ---------------------------------------------------------------------------- numpy reference (float64)


MASKED = np.finfo(np.float64).min  # additive-mask value; rows of padding queries then average (not compared)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def layer_norm_ref(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm_ref(x, w, eps=1e-6):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rope_table_ref(positions, dim, theta):
    """cos, sin [B, T, dim] of `DeepseekV2RotaryEmbedding`: the angles are float32 as in the reference's
    table (inv_freq, positions and their product in float32); cos and sin themselves in float64."""
    inv_freq = (np.float32(1.0) / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    freqs = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)
    emb = np.concatenate([freqs, freqs], -1).astype(np.float64)
    return np.cos(emb), np.sin(emb)


def rotate_half_ref(x):
    d = x.shape[-1] // 2
    return np.concatenate([-x[..., d:], x[..., :d]], -1)


def rope_bhtd_ref(x_bhtd, cos_btd, sin_btd):
    """Llama `apply_rotary_pos_emb` on [b, h, t, d] (cos/sin unsqueezed at dim 1)."""
    return x_bhtd * cos_btd[:, None] + rotate_half_ref(x_bhtd) * sin_btd[:, None]


def rope_interleaved_bhtd_ref(x_bhtd, cos_btd, sin_btd):
    """DeepSeek `apply_rotary_pos_emb`: view(b, h, t, d/2, 2).transpose(4, 3).reshape(b, h, t, d), then rotate-half."""
    b, h, t, d = x_bhtd.shape
    x = x_bhtd.reshape(b, h, t, d // 2, 2).swapaxes(3, 4).reshape(b, h, t, d)
    return rope_bhtd_ref(x, cos_btd, sin_btd)


def vit_block_ref(x, sd, i, cfg):
    """timm `Block`: x + attn(norm1(x)); x + mlp(norm2(x)); fused qkv with bias, GELU tanh."""
    s, v = f"vision.blocks.{i}.", cfg.vision
    n_img, n, c = x.shape
    h = layer_norm_ref(x, sd[s + "norm1.weight"], sd[s + "norm1.bias"])
    qkv = linear(h, sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]).reshape(n_img, n, 3, v.heads, v.head_dim)
    q, k, val = qkv.transpose(2, 0, 3, 1, 4)  # each [I, heads, N, head_dim]
    attn = softmax((q * v.head_dim**-0.5) @ k.swapaxes(-1, -2))
    o = (attn @ val).transpose(0, 2, 1, 3).reshape(n_img, n, c)
    x = x + linear(o, sd[s + "attn.proj.weight"], sd[s + "attn.proj.bias"])
    h = layer_norm_ref(x, sd[s + "norm2.weight"], sd[s + "norm2.bias"])
    h = gelu_tanh(linear(h, sd[s + "mlp.fc1.weight"], sd[s + "mlp.fc1.bias"]))
    return x + linear(h, sd[s + "mlp.fc2.weight"], sd[s + "mlp.fc2.bias"])


def patch_embed_ref(images, sd, cfg):
    """Conv2d(3, C, kernel=p, stride=p, no padding) -> flatten(2).transpose(1, 2), + pos_embed."""
    v = cfg.vision
    p, g = v.patch_size, v.grid
    w, b = sd["vision.patch_embed.proj.weight"], sd["vision.patch_embed.proj.bias"]  # [C, 3, p, p]
    out = np.zeros((images.shape[0], v.width, g, g))
    for y in range(g):
        for x in range(g):
            window = images[:, :, y * p : (y + 1) * p, x * p : (x + 1) * p]  # [I, 3, p, p]
            out[:, :, y, x] = np.einsum("icyx,Ccyx->iC", window, w) + b
    return out.reshape(images.shape[0], v.width, g * g).transpose(0, 2, 1) + sd["vision.pos_embed"]


def vit_ref(images, sd, cfg):
    x = patch_embed_ref(images, sd, cfg)
    for i in range(cfg.vision.layers):
        x = vit_block_ref(x, sd, i, cfg)
    return layer_norm_ref(x, sd["vision.norm.weight"], sd["vision.norm.bias"])


def projector_ref(x, sd):
    """`MlpProjector` (downsample_mlp_gelu): pad to even, F.unfold(2, stride 2), Linear, GELU(erf), Linear."""
    n, hw, c = x.shape
    g = int(round(hw**0.5))
    pad = g % 2
    x = x.reshape(n, g, g, c)
    x = np.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0))).transpose(0, 3, 1, 2)  # [I, C, H, W]
    h2 = (g + pad) // 2
    cols = np.zeros((n, c * 4, h2 * h2))  # F.unfold: channel index c * 4 + di * 2 + dj; blocks row-major
    for ch in range(c):
        for di in range(2):
            for dj in range(2):
                for by in range(h2):
                    for bx in range(h2):
                        cols[:, ch * 4 + di * 2 + dj, by * h2 + bx] = x[:, ch, 2 * by + di, 2 * bx + dj]
    x = cols.transpose(0, 2, 1)
    x = gelu_erf(linear(x, sd["projector.layers.0.weight"], sd["projector.layers.0.bias"]))
    return linear(x, sd["projector.layers.2.weight"], sd["projector.layers.2.bias"])


def mha_ref(x, sd, s, lc, positions, mask):
    """transformers 4.38 `LlamaAttention` (eager): rotate-half RoPE over the head dim, `repeat_kv` for GQA."""
    b, t, _ = x.shape
    h, g, k = lc.num_attention_heads, lc.num_key_value_heads, lc.head_dim
    q = linear(x, sd[s + "q_proj.weight"]).reshape(b, t, h, k).transpose(0, 2, 1, 3)
    kk = linear(x, sd[s + "k_proj.weight"]).reshape(b, t, g, k).transpose(0, 2, 1, 3)
    v = linear(x, sd[s + "v_proj.weight"]).reshape(b, t, g, k).transpose(0, 2, 1, 3)
    cos, sin = rope_table_ref(positions, k, lc.rope_theta)
    q, kk = rope_bhtd_ref(q, cos, sin), rope_bhtd_ref(kk, cos, sin)
    kk, v = np.repeat(kk, h // g, axis=1), np.repeat(v, h // g, axis=1)  # kv head j serves q heads j*n_rep...
    scores = np.where(mask[:, None], q @ kk.swapaxes(-1, -2) / math.sqrt(k), MASKED)
    o = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, t, h * k)
    return linear(o, sd[s + "o_proj.weight"])


def mla_ref(x, sd, s, lc, positions, mask):
    """`DeepseekV2Attention` (MLA, absorbed form, as the reference's eager path)."""
    b, t, _ = x.shape
    h, kn, j, r, u = lc.num_attention_heads, lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.kv_lora_rank, lc.v_head_dim
    if lc.q_lora_rank is None:
        q = linear(x, sd[s + "q_proj.weight"])
    else:
        qa = rms_norm_ref(linear(x, sd[s + "q_a_proj.weight"]), sd[s + "q_a_layernorm.weight"])
        q = linear(qa, sd[s + "q_b_proj.weight"])
    q = q.reshape(b, t, h, kn + j).transpose(0, 2, 1, 3)
    q_nope, q_pe = q[..., :kn], q[..., kn:]
    ckv = linear(x, sd[s + "kv_a_proj_with_mqa.weight"])
    latent = rms_norm_ref(ckv[..., :r], sd[s + "kv_a_layernorm.weight"])  # [b, t, r]
    k_pe = ckv[..., r:].reshape(b, t, 1, j).transpose(0, 2, 1, 3)
    cos, sin = rope_table_ref(positions, j, lc.rope_theta)
    q_pe, k_pe = rope_interleaved_bhtd_ref(q_pe, cos, sin), rope_interleaved_bhtd_ref(k_pe, cos, sin)
    kv_b = sd[s + "kv_b_proj.weight"].reshape(h, kn + u, r)
    q_absorb, out_absorb = kv_b[:, :kn], kv_b[:, kn:]
    q_lat = q_nope @ q_absorb  # [b, h, t, r]
    scores = (q_pe @ k_pe.swapaxes(-1, -2) + q_lat @ latent[:, None].swapaxes(-1, -2)) * (kn + j) ** -0.5
    probs = softmax(np.where(mask[:, None], scores, MASKED))
    o = np.einsum("bhql,blc->bhqc", probs, latent) @ out_absorb.swapaxes(-1, -2)  # [b, h, t, u]
    return linear(o.transpose(0, 2, 1, 3).reshape(b, t, h * u), sd[s + "o_proj.weight"])


def swiglu_ref(x, sd, s):
    """`DeepseekV2MLP`: down(silu(gate(x)) * up(x))."""
    return linear(silu(linear(x, sd[s + "gate_proj.weight"])) * linear(x, sd[s + "up_proj.weight"]),
                  sd[s + "down_proj.weight"])


def route_ref(logits, lc, bias=None):
    """`MoEGate.forward` per token. Returns (ids [N, k], weights [N, k], margins [N], differs [N]).

    `margins` is the smallest gap the selection depends on (k-th vs (k+1)-th choice value, and the same for
    groups); `differs` is True where the grouped/biased choice is not plain top-k of the scores.
    """
    logits = np.asarray(logits, np.float64)
    n, e = logits.shape
    k = lc.num_experts_per_tok
    scores = softmax(logits) if lc.scoring_func == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    ids, weights = np.zeros((n, k), np.int64), np.zeros((n, k))
    margins, differs = np.full(n, np.inf), np.zeros(n, bool)
    for i in range(n):
        s = scores[i]
        choice = s + bias if lc.topk_method == "noaux_tc" else s
        if lc.topk_method == "greedy":
            masked = choice
        else:
            grouped = choice.reshape(lc.n_group, -1)
            if lc.topk_method == "group_limited_greedy":
                group_scores = grouped.max(-1)
            else:
                group_scores = np.sort(grouped, -1)[:, -2:].sum(-1)
            order = np.argsort(-group_scores)
            if lc.topk_group < lc.n_group:
                margins[i] = group_scores[order[lc.topk_group - 1]] - group_scores[order[lc.topk_group]]
            keep = np.zeros(lc.n_group, bool)
            keep[order[: lc.topk_group]] = True
            masked = np.where(np.repeat(keep, e // lc.n_group), choice, 0.0)
        order = np.argsort(-masked)
        margins[i] = min(margins[i], masked[order[k - 1]] - masked[order[k]])
        ids[i] = order[:k]
        w = s[ids[i]] if lc.topk_method == "noaux_tc" else masked[ids[i]]
        if k > 1 and lc.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        weights[i] = w * lc.routed_scaling_factor
        differs[i] = set(ids[i]) != set(np.argsort(-s)[:k])
    return ids, weights, margins, differs


def moe_ref(x, sd, s, lc):
    """`DeepseekV2MoE` (eval): gate on float32 logits, sum of weight * expert(x), plus shared experts."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    ids, weights, margins, _ = route_ref(x @ sd[s + "gate.weight"].T, lc, sd.get(s + "gate.e_score_correction_bias"))
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e, w in zip(ids[n], weights[n], strict=True):
            y[n] += w * swiglu_ref(x[n], sd, f"{s}experts.{e}.")
    if lc.n_shared_experts:
        y = y + swiglu_ref(x, sd, s + "shared_experts.")
    return y.reshape(shape), margins


def image_layout_ref(text_embeds, feats, crops, seq_mask, newline, separator):
    """`prepare_inputs_embeds` with tile_tag "2D", global_view_pos "head", on features [tiles, h*w, D]."""
    out = text_embeds.copy()
    side = int(round(feats.shape[1] ** 0.5))
    d = feats.shape[-1]
    tile = 0
    for row in range(crops.shape[0]):
        pieces = []
        for nw, nh in crops[row]:
            if nw == 0 or nh == 0:
                break
            glob = np.concatenate([feats[tile].reshape(side, side, d), np.broadcast_to(newline, (side, 1, d))], 1)
            local = feats[tile + 1 : tile + 1 + nw * nh]  # "(th tw) (h w) d -> (th h) (tw w) d"
            local = local.reshape(nh, nw, side, side, d).transpose(0, 2, 1, 3, 4).reshape(nh * side, nw * side, d)
            local = np.concatenate([local, np.broadcast_to(newline, (nh * side, 1, d))], 1)
            pieces += [glob.reshape(-1, d), separator[None], local.reshape(-1, d)]
            tile += 1 + nw * nh
        if pieces:
            out[row, seq_mask[row]] = np.concatenate(pieces)  # masked_scatter_: in order
    return out


# ------------------------------------------------------------------------------------------ small ops


def test_rms_norm():
    """RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, eps inside the root (inputs small enough that it matters)."""
    rng = np.random.default_rng(1)
    x, w = randn(rng, 3, 5, 37, scale=1e-3), (1 + randn(rng, 37, scale=0.3))
    got = run(RMSNorm(37, 1e-6), {"scale": w}, x)
    assert_close(got, rms_norm_ref(x.astype(np.float64), w.astype(np.float64), 1e-6))


def test_rope_rotate_half():
    """MHA RoPE: cos/sin table at the given (offset, irregular) positions, rotate-half over the whole head dim."""
    rng = np.random.default_rng(2)
    positions = np.array([[3, 17, 250, 1999, 4], [1000, 1001, 0, 77, 3071]], np.int32)
    x = randn(rng, 2, 5, 3, 10)  # [B, T, H, K]
    cos, sin = rope_cos_sin(jnp.asarray(positions), 10, 500.0, jnp.float32)
    got = apply_rope(jnp.asarray(x), cos, sin)
    cos_r, sin_r = rope_table_ref(positions, 10, 500.0)
    assert_close(cos, cos_r)
    assert_close(sin, sin_r)
    want = rope_bhtd_ref(x.astype(np.float64).transpose(0, 2, 1, 3), cos_r, sin_r).transpose(0, 2, 1, 3)
    assert_close(got, want)


def test_rope_interleaved():
    """MLA RoPE: de-interleave (x0, x2, ..., x1, x3, ...) then rotate-half, i.e. a rotation of the pairs
    (x_{2i}, x_{2i+1}) by angle pos * inv_freq_i, left in the de-interleaved order as the reference does."""
    rng = np.random.default_rng(3)
    positions = np.array([[3, 17, 250, 1999, 4], [1000, 1001, 0, 77, 3071]], np.int32)
    x = randn(rng, 2, 5, 3, 8)
    cos, sin = rope_cos_sin(jnp.asarray(positions), 8, 10000.0, jnp.float32)
    got = apply_rope_interleaved(jnp.asarray(x), cos, sin)
    cos_r, sin_r = rope_table_ref(positions, 8, 10000.0)
    x64 = x.astype(np.float64)
    want = rope_interleaved_bhtd_ref(x64.transpose(0, 2, 1, 3), cos_r, sin_r).transpose(0, 2, 1, 3)
    assert_close(got, want)
    # The same thing written as complex rotation of adjacent pairs.
    angle = np.arccos(cos_r[..., :4])[:, :, None] * np.sign(sin_r[..., :4])[:, :, None]
    pairs = (x64[..., 0::2] + 1j * x64[..., 1::2]) * np.exp(1j * angle)
    assert_close(got, np.concatenate([pairs.real, pairs.imag], -1))


# ------------------------------------------------------------------------------------ vision + projector


def test_vision_block():
    """One SigLIP block: LayerNorm eps 1e-6, fused qkv rows (q|k|v, head, dim) with bias, softmax attention
    scaled by head_dim^-0.5, output proj, GELU tanh MLP, both residuals."""
    cfg = make_cfg(vision=VISION)
    sd, params = convert(cfg, ("vision", "block_1"))
    x = randn(np.random.default_rng(4), 2, cfg.vision.num_patches, cfg.vision.width)
    got = run(VisionBlock(cfg.vision), params, x)
    assert_close(got, vit_block_ref(x.astype(np.float64), sd, 1, cfg))


def test_vision_patch_and_pos_embed():
    """Patch conv (stride p, the last S - g*p pixels dropped), row-major patches, + pos_embed, final norm."""
    cfg = make_cfg(vision=dict(VISION, layers=0))
    assert cfg.vision.image_size % cfg.vision.patch_size != 0  # the remainder really is dropped
    sd, params = convert(cfg, ("vision",))
    images = randn(np.random.default_rng(5), 2, 3, 38, 38)
    got = run(VisionTransformer(cfg.vision), params, images)
    assert_close(got, vit_ref(images.astype(np.float64), sd, cfg))


def test_vision_tower():
    """The whole tower: embedding, blocks in order block_0, block_1, final LayerNorm."""
    cfg = make_cfg(vision=VISION)
    sd, params = convert(cfg, ("vision",))
    images = randn(np.random.default_rng(6), 2, 3, 38, 38)
    got = run(VisionTransformer(cfg.vision), params, images)
    assert_close(got, vit_ref(images.astype(np.float64), sd, cfg))


def test_vision_layer_norms_at_a_scale_where_eps_matters():
    """Every LayerNorm of the tower (each block's norm1 and norm2, the final norm) sees activations of
    variance ~1e-6, the size of the official eps: the patch embedding, position embedding and what each
    block adds to the residual stream are scaled by 1e-3. Against the reference with eps 1e-6 written
    here (MODEL_FACTS.md), so a 10x eps anywhere is off by far more than the tolerance."""
    cfg = make_cfg(vision=VISION)
    small = ("patch_embed.", "pos_embed", "attn.proj.", "mlp.fc2.")
    sd, params = convert(cfg, ("vision",), seed=3, scale=lambda name: 1e-3 if any(s in name for s in small) else 1.0)
    images = randn(np.random.default_rng(8), 2, 3, 38, 38)
    x = patch_embed_ref(images.astype(np.float64), sd, cfg)
    assert 1e-7 < x.var(-1).mean() < 1e-5  # the scale where eps counts
    got = run(VisionTransformer(cfg.vision), params, images)
    assert_close(got, vit_ref(images.astype(np.float64), sd, cfg))


@pytest.mark.parametrize("grid", [5, 4], ids=["odd-grid-padded", "even-grid"])
def test_projector(grid):
    """Projector: zero-pad the grid bottom/right to even, 2x2 unfold with channel index c*4 + di*2 + dj and
    blocks row-major, Linear, exact (erf) GELU, Linear."""
    cfg = make_cfg(vision=dict(VISION, image_size=grid * 7))
    sd, params = convert(cfg, ("projector",))
    x = randn(np.random.default_rng(7), 3, grid * grid, cfg.vision.width)
    got = run(Projector(cfg.projector, grid), params, x)
    assert got.shape == (3, ((grid + 1) // 2) ** 2, cfg.language.hidden_size)
    assert_close(got, projector_ref(x.astype(np.float64), sd))


# ------------------------------------------------------------------------------------------ attention


def _self_attend(module, x, positions, mask):
    """An attention module (or decoder layer) on its own tokens: keys from `new_kv` of the same x."""
    return module(x, positions, module.new_kv(x, positions), mask)


def _self_attend_causal_on(valid: np.ndarray):
    """`_self_attend`, also told that the mask is causal over the keys `valid` marks (`key_valid`)."""
    return lambda module, x, positions, mask: module(x, positions, module.new_kv(x, positions), mask,
                                                     jnp.asarray(valid))


# (impl, method): the plain path, the fused form with the mask, the fused causal form (invalid keys flagged)
ATTENTION_FORMS = {"plain": ("plain", _self_attend), "xla": ("xla", _self_attend),
                   "xla_causal": ("xla", _self_attend_causal_on(VALID))}


@pytest.mark.parametrize("form", ATTENTION_FORMS)
def test_mha_attention_gqa(form):
    """MHA (deepseek-vl2-tiny): q/k/v/o projections, rotate-half RoPE over the head dim with config theta at
    the given positions, GQA (query head i uses kv head i // (H/G)), scores / sqrt(head_dim), causal + padding
    mask. Rows of padding queries are not compared (undefined in both). "xla" is the fused form that cuDNN
    runs on GPUs (`jax.nn.dot_product_attention`), "plain" the reference's arithmetic."""
    impl, method = ATTENTION_FORMS[form]
    cfg = make_cfg(**MHA)
    sd, params = convert(cfg, ("language", "layers_0", "attn"))
    x = randn(np.random.default_rng(8), 2, 7, cfg.language.hidden_size)
    got = run(MHAttention(cfg.language, runtime=Runtime(attention=impl)), params, x, POSITIONS, causal_mask(VALID), method=method)
    want = mha_ref(x.astype(np.float64), sd, "language.model.layers.0.self_attn.", cfg.language, POSITIONS,
                   causal_mask(VALID))
    assert_close(got[VALID], want[VALID])


@pytest.mark.parametrize("form", ATTENTION_FORMS)
@pytest.mark.parametrize("q_lora_rank", [None, 23], ids=["q_proj", "q_lora"])
def test_mla_attention(q_lora_rank, form):
    """MLA (small/base): q (direct or LoRA with RMSNorm) split per head nope | rope; kv_a -> RMS-normed latent
    | shared k_rope; interleaved RoPE; kv_b_proj per head [k_nope; v] absorbed ("plain") or expanded into
    per-head keys and values (the fused form, "xla"); scale (nope+rope)^-0.5."""
    impl, method = ATTENTION_FORMS[form]
    cfg = make_cfg(**dict(MLA, q_lora_rank=q_lora_rank))
    sd, params = convert(cfg, ("language", "layers_0", "attn"))
    x = randn(np.random.default_rng(9), 2, 7, cfg.language.hidden_size)
    got = run(MLAttention(cfg.language, runtime=Runtime(attention=impl)), params, x, POSITIONS, causal_mask(VALID), method=method)
    want = mla_ref(x.astype(np.float64), sd, "language.model.layers.0.self_attn.", cfg.language, POSITIONS,
                   causal_mask(VALID))
    assert_close(got[VALID], want[VALID])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_invalid_key_flags_leave_valid_scores_and_stay_finite(dtype):
    """The fused causal form's key flags: valid keys' scores unchanged, invalid ones lowered by 32768,
    every score finite in every dtype (an infinite flag in float16 would make a row of padding queries,
    whose keys are all invalid, NaN, and 0 * NaN would carry it into real rows)."""
    from vl2_jax.modules.attention import INVALID_KEY_SCORE, flag_invalid_keys

    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(randn(rng, 2, 5, 4, 16), dtype) for _ in range(2))  # 4 query heads, 4 key heads
    q2, k2 = flag_invalid_keys(q, k, jnp.asarray(VALID[:, :5]))
    before = np.einsum("bthk,bshk->bhts", np.float32(q), np.float32(k))
    after = np.einsum("bthk,bshk->bhts", np.float32(q2), np.float32(k2))
    assert np.isfinite(after).all()
    lowered = np.where(VALID[:, None, None, :5], 0.0, INVALID_KEY_SCORE)
    np.testing.assert_allclose(after, before + lowered, rtol=0, atol=1e-2 * np.abs(before).max())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on NVIDIA GPUs")
@pytest.mark.parametrize("use_mla", [False, True], ids=["mha", "mla"])
def test_cudnn_prompt_attention_agrees_with_plain(use_mla):
    """bf16 on a GPU, the real head sizes: "auto" runs cuDNN flash attention for a prompt (and the plain
    path for one query), and its outputs agree with the plain path's (cosine >= 0.999 on real queries),
    with the mask as a bias and causal with the invalid keys flagged."""
    dims = (dict(MLA, hidden_size=256, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, q_lora_rank=None) if use_mla
            else dict(MHA, hidden_size=256, num_attention_heads=2, num_key_value_heads=2))
    lc = make_cfg(**dims).language
    cls = MLAttention if use_mla else MHAttention
    t = 96
    x = jnp.asarray(randn(np.random.default_rng(3), 2, t, lc.hidden_size), jnp.bfloat16)
    valid = np.ones((2, t), bool)
    valid[1, :17] = False
    positions = jnp.asarray(np.maximum(np.cumsum(valid, -1) - 1, 0), jnp.int32)
    mask = jnp.asarray(causal_mask(valid))
    params = jax.jit(cls(lc, jnp.bfloat16).init, static_argnames="method")(
        jax.random.key(0), x, positions, mask, method=_self_attend)["params"]
    outs = {}
    for form, impl, method in (("mask", "auto", _self_attend), ("causal", "auto", _self_attend_causal_on(valid)),
                               ("plain", "plain", _self_attend)):
        fn = jax.jit(functools.partial(cls(lc, jnp.bfloat16, Runtime(attention=impl)).apply, method=method))
        outs[form] = np.asarray(fn({"params": params}, x, positions, mask), np.float32)[valid].ravel()
        hlo = fn.lower({"params": params}, x, positions, mask).as_text()
        assert ("cudnn" in hlo) == (impl == "auto"), form
    # decoding one token stays on the plain (absorbed) path
    decode = jax.jit(functools.partial(cls(lc, jnp.bfloat16).apply, method=_self_attend))
    assert "cudnn" not in decode.lower({"params": params}, x[:, :1], positions[:, :1], mask[:, :1, :1]).as_text()
    b = outs["plain"]
    for form, a in outs.items():
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999, form


def test_mla_inner_norms_keep_eps_1e6():
    """With config.rms_norm_eps != 1e-6, MLA's inner RMSNorms still use 1e-6 (only the decoder-layer norms take
    the config's eps). Small inputs make eps matter."""
    cfg = make_cfg(**MLA, rms_norm_eps=1e-4)
    sd, params = convert(cfg, ("language", "layers_0", "attn"))
    x = randn(np.random.default_rng(9), 2, 7, cfg.language.hidden_size, scale=0.01)
    got = run(MLAttention(cfg.language), params, x, POSITIONS, causal_mask(VALID), method=_self_attend)
    want = mla_ref(x.astype(np.float64), sd, "language.model.layers.0.self_attn.", cfg.language, POSITIONS,
                   causal_mask(VALID))  # mla_ref's inner norms use eps 1e-6, as the reference
    assert_close(got[VALID], want[VALID])


# -------------------------------------------------------------------------------------------- routing

ROUTING = {
    "greedy-softmax": dict(topk_method="greedy", scoring_func="softmax"),
    "greedy-sigmoid-renorm-scaled": dict(topk_method="greedy", scoring_func="sigmoid", norm_topk_prob=True,
                                         routed_scaling_factor=2.5),
    "greedy-top1-no-renorm": dict(topk_method="greedy", num_experts_per_tok=1, norm_topk_prob=True,
                                  routed_scaling_factor=1.5),
    "group-softmax-renorm": dict(topk_method="group_limited_greedy", n_group=5, topk_group=2, norm_topk_prob=True),
    "group-sigmoid-scaled": dict(topk_method="group_limited_greedy", scoring_func="sigmoid", n_group=5,
                                 topk_group=2, routed_scaling_factor=0.7),
    "noaux-sigmoid-renorm-scaled": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=5, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.0),
    "noaux-softmax-scaled": dict(topk_method="noaux_tc", n_group=3, topk_group=1, routed_scaling_factor=1.3),
}
_ROUTING_DEFAULTS = dict(n_group=None, topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0,
                         scoring_func="softmax")


@pytest.mark.parametrize("case", list(ROUTING))
def test_route(case):
    """MoEGate: softmax/sigmoid scores; greedy, group_limited_greedy (groups by max) or noaux_tc (choose by
    score + bias, groups by sum of top-2, weight by the raw score); renorm only if k > 1; scaling factor.
    Expert sets are compared per token; tokens with a near-tie are dropped by construction."""
    lc = make_cfg(**{**EXPERTS, **_ROUTING_DEFAULTS, **ROUTING[case]}).language
    rng = np.random.default_rng(10)
    logits = randn(rng, 96, lc.n_routed_experts, scale=2.0)
    # Scores and bias are positive, so the 0.0 that masked groups are filled with never outranks a kept expert
    # (which of several equal zeros torch.topk would pick is unspecified, so that case is not testable).
    bias = rng.uniform(0.0, 0.5, lc.n_routed_experts).astype(np.float32) if lc.topk_method == "noaux_tc" else None
    ids, weights, margins, differs = route_ref(logits, lc, None if bias is None else bias.astype(np.float64))
    keep = margins > 1e-3
    assert keep.sum() >= 48
    if lc.topk_method != "greedy":
        assert differs[keep].any(), "test construction: the group limit / bias never changes the choice"
    got_w, got_ids = jax.jit(route, static_argnums=1)(logits[keep], lc, bias)
    got_w, got_ids = np.array(got_w), np.asarray(got_ids)
    assert got_ids.shape == ids[keep].shape
    for n, (gi, gw, ri) in enumerate(zip(got_ids, got_w, ids[keep], strict=True)):
        gi, ri = gi.tolist(), ri.tolist()
        assert set(gi) == set(ri), f"token {n}: experts {sorted(gi)} != reference {sorted(ri)}"
        got_by_id = dict(zip(gi, gw.tolist(), strict=True))
        got_w[n] = [got_by_id[e] for e in ri]  # our weights in the reference's expert order
    assert_close(got_w, weights[keep])


# ------------------------------------------------------------------------------------------ MLP and MoE


def test_dense_mlp():
    """Dense SwiGLU MLP (layer 0): down(silu(gate(x)) * up(x)) with the intermediate size of the config."""
    cfg = make_cfg(**MLA, intermediate_size=71)
    sd, params = convert(cfg, ("language", "layers_0", "mlp"))
    x = randn(np.random.default_rng(11), 2, 5, cfg.language.hidden_size)
    got = run(MLP(cfg.language.hidden_size, cfg.language.intermediate_size), params, x)
    assert_close(got, swiglu_ref(x.astype(np.float64), sd, "language.model.layers.0.mlp."))


MOE = {
    "greedy-softmax-2shared": dict(topk_method="greedy", n_shared_experts=2, n_group=None, topk_group=None),
    "noaux-sigmoid-1shared": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=5, topk_group=2,
                                  norm_topk_prob=True, routed_scaling_factor=2.0, n_shared_experts=1),
    "group-softmax-noshared": dict(topk_method="group_limited_greedy", n_group=5, topk_group=2,
                                   n_shared_experts=None, routed_scaling_factor=1.7),
}


@pytest.mark.parametrize("case", list(MOE))
def test_moe(case):
    """MoE layer: float32 router logits x @ W_gate.T, routing, sum over chosen experts of weight * expert(x)
    (experts stacked in id order), plus the shared experts (one MLP of width moe_intermediate * n_shared)."""
    cfg = make_cfg(**{**MLA, **EXPERTS, **MOE[case]})
    sd, params = convert(cfg, ("language", "layers_1", "mlp"), seed=12)
    x = randn(np.random.default_rng(13), 2, 6, cfg.language.hidden_size)
    want, margins = moe_ref(x.astype(np.float64), sd, "language.model.layers.1.mlp.", cfg.language)
    assert margins.min() > 1e-4, "test construction: near-tie in routing, pick another seed"
    got = run(MoE(cfg.language), params, x)
    assert_close(got, want)


def test_decoder_layer():
    """Decoder layer 1 (MLA with query LoRA + noaux_tc MoE): x + attn(input_layernorm(x)), then
    + mlp(post_attention_layernorm(x)); the MoE/dense choice follows first_k_dense_replace."""
    cfg = make_cfg(**{**MLA, **EXPERTS, **MOE["noaux-sigmoid-1shared"]})
    sd, params = convert(cfg, ("language", "layers_1"), seed=14)
    x = randn(np.random.default_rng(15), 2, 7, cfg.language.hidden_size)
    got = run(DecoderLayer(cfg.language, 1), params, x, POSITIONS, causal_mask(VALID), method=_self_attend)

    s = "language.model.layers.1."
    h = x.astype(np.float64)
    h = h + mla_ref(rms_norm_ref(h, sd[s + "input_layernorm.weight"]), sd, s + "self_attn.", cfg.language,
                    POSITIONS, causal_mask(VALID))
    moe, margins = moe_ref(rms_norm_ref(h, sd[s + "post_attention_layernorm.weight"]), sd, s + "mlp.", cfg.language)
    assert margins[VALID.reshape(-1)].min() > 1e-4, "test construction: near-tie in routing, pick another seed"
    want = h + moe
    assert_close(got[VALID], want[VALID])


# --------------------------------------------------------------------------------------- image layout


def test_image_token_layout_multi_image():
    """`image_token_sources` + `VL2.embed` on a batch of two rows: row 0 has a 2x1 and a 1x3 image, row 1 a 1x2
    image after left padding (and a zero row in images_spatial_crop). Per image: the global h x w grid with
    image_newline after each row, view_separator, then the local tiles stitched (th h) x (tw w) with
    image_newline after each row; written at the images_seq_mask positions in order, text embeddings elsewhere."""
    cfg = make_cfg(vision=dict(VISION, layers=1), num_hidden_layers=1)
    side = cfg.tokens_per_tile_side
    assert side == 3
    sd, params = convert(cfg, seed=16)
    crops = np.array([[[2, 1], [1, 3]], [[1, 2], [0, 0]]])

    def n_tokens(nw, nh):
        return side * (side + 1) + 1 + nh * side * (nw * side + 1)

    rng = np.random.default_rng(17)
    # Row 0: 3 text, image (2x1), 2 text, image (1x3), 4 text.  Row 1: left padding, 5 text, image (1x2), 3 text.
    kinds0 = [0] * 3 + [1] * n_tokens(2, 1) + [0] * 2 + [1] * n_tokens(1, 3) + [0] * 4
    body1 = [0] * 5 + [1] * n_tokens(1, 2) + [0] * 3
    kinds1 = [0] * (len(kinds0) - len(body1)) + body1
    seq_mask = np.array([kinds0, kinds1], bool)
    ids = rng.integers(2, cfg.language.vocab_size, seq_mask.shape).astype(np.int32)

    images = randn(rng, 2, 7, 3, 38, 38)  # [B, max tiles, 3, S, S]; row 1 uses 3 tiles, the rest is junk
    images[1, 3:] = 1e3
    tiles, src = image_token_sources(crops, seq_mask, side)
    assert tiles.tolist() == [[0, t] for t in range(7)] + [[1, t] for t in range(3)]
    tiles_i = images[tiles[:, 0], tiles[:, 1]]

    got = run(VL2(cfg), params, ids, tiles_i, src, seq_mask, method=VL2.embed)
    # Features come from our own vision tower + projector (pinned by the tests above); this test is the layout.
    feats = run(VL2(cfg), params, tiles_i, method=VL2.image_features).astype(np.float64)
    assert feats.shape == (10, side * side, cfg.language.hidden_size)
    text = sd["language.model.embed_tokens.weight"][ids]
    want = image_layout_ref(text, feats, crops, seq_mask, sd["image_newline"], sd["view_seperator"])
    assert_close(got, want)


def test_image_token_sources_refuses_wrong_count():
    """A mask whose number of image positions disagrees with images_spatial_crop is an InputError."""
    crops = np.array([[[1, 1]]])
    mask = np.zeros((1, 30), bool)
    mask[0, 2:2 + 3 * 4 + 1 + 3 * 4 - 1] = True  # one position short
    with pytest.raises(InputError, match="image-token positions"):
        image_token_sources(crops, mask, 3)


def test_vision_attention_auto_is_plain_off_gpu():
    """Off NVIDIA GPUs (and in float32) "auto" is the plain path; cuDNN is chosen only where it runs."""
    from vl2_jax.kernels import cudnn_attention_usable as cudnn_usable
    from vl2_jax.modules.vision import attend, attend_plain

    q, k, v = (jnp.asarray(randn(np.random.default_rng(i), 2, 9, 3, 8)) for i in range(3))
    assert not cudnn_usable(jnp.float32, 8) and not cudnn_usable(jnp.bfloat16, 12)
    np.testing.assert_array_equal(np.asarray(attend(q, k, v)), np.asarray(attend_plain(q, k, v)))
    if jax.default_backend() != "gpu":
        assert not cudnn_usable(jnp.bfloat16, 8)


ONE_ROW_PRODUCTS = [  # (spec, activation shape, weight shape): the decode step's projections at batch 1
    ("BTD,DHK->BTHK", (1, 1, 256), (256, 4, 48)),
    ("BTHU,HUD->BTD", (1, 1, 2, 128), (2, 128, 320)),
    ("...F,FD->...D", (1, 1, 384), (384, 128)),
    ("...D,DWF->...WF", (1, 1, 128), (128, 2, 64)),
    ("BTD,DWGK->WBTGK", (1, 1, 256), (256, 2, 2, 32)),  # tiny's keys and values: output axes reordered
]


@pytest.mark.parametrize("spec,x_shape,w_shape", ONE_ROW_PRODUCTS)
def testone_row_products_through_the_matvec_kernel(monkeypatch, spec, x_shape, w_shape):
    """`layers.project` hands one row of bf16 activations times a weight to `kernels.dense_matvec` (here
    interpreted, switched in as on a GPU) with the right shapes; the result equals the float32 einsum.
    Two rows, a float32 activation, a batched weight or `use_kernel=False` keep the plain einsum."""
    from vl2_jax import kernels
    from vl2_jax.modules import layers

    calls = []

    def interpreted(x, w, out_dtype):
        calls.append((x.shape, w.shape))
        return kernels.dense_matvec(x, w, interpret=True, out_dtype=out_dtype)

    monkeypatch.setattr(layers, "dense_matvec_usable", lambda dtype, k, n: dtype == jnp.bfloat16)
    monkeypatch.setattr(layers, "dense_matvec", interpreted)
    k = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(k[0], x_shape).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], w_shape) / 16).astype(jnp.bfloat16)
    got = layers.project(spec, x, w, use_kernel=True)
    want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    assert len(calls) == 1 and got.dtype == jnp.bfloat16 and got.shape == want.shape
    assert float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max()) < 1e-2
    two_rows = jnp.concatenate([x, x], axis=0)
    layers.project(spec, two_rows, w, use_kernel=True)
    layers.project(spec, x.astype(jnp.float32), w.astype(jnp.float32), use_kernel=True)
    layers.project(spec, x, w, use_kernel=False)
    layers.einsum(spec, x, w)
    assert len(calls) == 1


REFUSED_PRODUCTS = [  # (spec, activation shape, weight shape) that are not one row times a weight
    ("BTHK,HKR->BTHR", (1, 1, 2, 8), (2, 8, 4)),  # per-head weights (the absorbed attention)
    ("BTD,DWGK->BTGWK", (1, 1, 8), (8, 2, 2, 4)),  # the weight's output axes reordered
    ("...D,DWF->WF...", (1, 1, 8), (8, 2, 4)),  # an ellipsis moved
    ("BSR,HKR->BSHK", (1, 1, 8), (2, 4, 8)),  # weight contracted on its last axis
    ("bdd,ddk->bk", (1, 4, 4), (4, 4, 8)),  # repeated letters (a diagonal)
    ("BTD,DK->BTK", (1, 8), (8, 4)),  # activation rank not the spec's
    ("BTD,DK->BTK", (1, 1, 8), (9, 4)),  # contracted sizes that differ
    ("ij,jk", (1, 4), (4, 3)),  # implicit output
]


@pytest.mark.parametrize("spec,x_shape,w_shape", REFUSED_PRODUCTS)
def test_other_products_keep_the_plain_einsum(spec, x_shape, w_shape):
    from vl2_jax.modules import layers

    assert layers.one_row_product(spec, jnp.zeros(x_shape), jnp.zeros(w_shape)) is None


def test_no_matvec_kernel_under_automatic_partitioning(monkeypatch):
    """Under a mesh XLA partitions, the kernel would see global arrays: `layers.project` keeps XLA's dot."""
    from vl2_jax.modules import layers

    calls = []
    monkeypatch.setattr(layers, "dense_matvec_usable", lambda *a: True)
    monkeypatch.setattr(layers, "dense_matvec", lambda x, w: calls.append(1))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = jnp.ones((1, 1, 128), jnp.bfloat16), jnp.ones((128, 64), jnp.bfloat16)
    with jax.set_mesh(mesh):
        layers.project("BTD,DK->BTK", x, w, use_kernel=True)
    assert not calls


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the matrix-vector kernel runs on NVIDIA GPUs")
def test_one_row_projections_run_the_kernel_on_the_gpu(monkeypatch):
    """On a GPU, small's batch-1 attention and shared-expert projections and tiny's keys and values take
    the kernel (jitted) and agree with the float32 einsum."""
    from vl2_jax.modules import layers

    calls, kernel = [], layers.dense_matvec

    def counted(x, w, **kw):
        calls.append(w.shape)
        return kernel(x, w, **kw)

    monkeypatch.setattr(layers, "dense_matvec", counted)
    for spec, x_shape, w_shape in [("BTD,DR->BTR", (1, 1, 2048), (2048, 576)),
                                   ("BTHU,HUD->BTD", (1, 1, 16, 128), (16, 128, 2048)),
                                   ("...F,FD->...D", (1, 1, 2816), (2816, 2048)),
                                   ("BTD,DWGK->WBTGK", (1, 1, 1280), (1280, 2, 10, 128))]:  # tiny's kv
        k = jax.random.split(jax.random.key(1), 2)
        x = jax.random.normal(k[0], x_shape).astype(jnp.bfloat16)
        w = (jax.random.normal(k[1], w_shape) / 32).astype(jnp.bfloat16)
        assert layers.dense_matvec_usable(jnp.bfloat16, *layers.one_row_product(spec, x, w)[:2])
        got = jax.jit(functools.partial(layers.project, spec, use_kernel=True))(x, w)
        want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        assert float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max()) < 1e-2
    assert calls == [(2048, 576), (2048, 2048), (2816, 2048), (1280, 2560)]


def test_mha_one_token_projections_take_the_kernel_and_agree(monkeypatch):
    """MHA at one token (tiny's decode step): q and o go to the matrix-vector kernel (interpreted,
    switched in as on a GPU), float keys and values keep XLA's product (faster there, measured); the new
    keys and values and the output agree with the einsum path's (bf16)."""
    from vl2_jax import kernels
    from vl2_jax.modules import layers

    calls = []

    def interpreted(x, w, out_dtype):
        calls.append(w.shape)
        return kernels.dense_matvec(x, w, interpret=True, out_dtype=out_dtype)

    cfg = make_cfg(**{**MHA, "hidden_size": 128, "num_attention_heads": 4})
    _, params = convert(cfg, ("language", "layers_0", "attn"))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    x = jnp.asarray(randn(np.random.default_rng(3), 1, 1, 128), jnp.bfloat16)
    positions, keys = np.array([[5]], np.int32), np.array([[True]])

    def step(kernel_on: bool):
        module = MHAttention(cfg.language, jnp.bfloat16, Runtime(attention="plain", kernels=kernel_on))
        kv = module.apply({"params": params}, x, positions, method=MHAttention.new_kv)
        return kv, module.apply({"params": params}, x, positions, kv, keys[:, None, :])

    want_kv, want = step(False)
    monkeypatch.setattr(layers, "dense_matvec_usable", lambda dtype, k, n: dtype == jnp.bfloat16)
    monkeypatch.setattr(layers, "dense_matvec", interpreted)
    got_kv, got = step(True)
    assert sorted(calls) == sorted([(128, 128), (128, 128)])  # q [D, H*K], o [H*K, D]
    for a, b in [(got_kv["k"], want_kv["k"]), (got_kv["v"], want_kv["v"]), (got, want)]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
