"""Why bf16 logits drift from float32 on random weights, in vl2-jax alone or beside PyTorch. (CPU or GPU)

    python benchmarks/bf16_drift.py jax --model small --layers 4 --tokens 48
    python benchmarks/bf16_drift.py jax --model base --layers 0 --tokens 1042 --same-weights
    python benchmarks/bf16_drift.py torch --model small --tokens 1042
    python benchmarks/bf16_drift.py torch --model small --layers 4 --tokens 1042   # fits a 24 GB CPU
    python benchmarks/bf16_drift.py torch --model small --layerwise --device cpu    # all layers on a CPU
    python benchmarks/bf16_drift.py torch --model base --layerwise                  # base on one H200

`jax`: vl2-jax alone, expert choices that flip. Runs the preset's language model, its first `--layers`
decoder layers (0: all), on a random text prompt eagerly in float32 and in bf16, one layer at a time:
each layer's random weights are drawn in float32 (seeded per layer, so not the same draw as
`init_params`), cast to bf16, used and dropped, so any depth fits in one layer's memory (small: 60 GB of
float32 layers, ~3.3 GB at a time). Reports per MoE layer the share of tokens whose set of chosen
experts differs, then the logits' cosine similarity two ways: float32 against bf16, and against bf16
made to use float32's expert choices and routing weights. If forcing the routing closes most of the
gap, the drift is the routers' near-ties flipping under bf16 rounding, not an inaccurate operation.
`--same-weights` runs the float32 reference on the bf16-rounded weights (only the arithmetic differs);
`--attention xla` runs bf16 with the fused attention form (the one cuDNN runs on GPUs).

`torch`: how far PyTorch's own bf16 drifts from its float32 on the same random weights, next to
vl2-jax's. Needs torch and a transformers with `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM`
(not project dependencies). Hugging Face's classes are an independent PyTorch implementation of
DeepSeek-VL2's language model: DeepseekV2 for softmax routing (small), DeepseekV3 for sigmoid
`noaux_tc` routing with renormalised, scaled weights (base); both with multi-head latent attention. At
a preset's size it draws random weights (normal(0.02), norm scales 1: the distribution of
`init_params`, except that the `noaux_tc` correction bias, zero there, is drawn too, so that its
conversion is checked), rounds them to bf16, and runs one random text prompt four ways on those same
weights: PyTorch in float32 and in bf16, then vl2-jax in float32 and in bf16 (the weights converted by
the checkpoint conversion rules, as a real checkpoint would be). PyTorch's rotary frequencies stay
float32 in its bf16 run, as in the official code. Reports each run's logits cosine similarity against
PyTorch float32 (min and mean over positions, and how often the top token agrees) and, per MoE layer,
the share of tokens whose experts differ between PyTorch's float32 and bf16. If PyTorch's bf16 is as
far from its float32 as vl2-jax's bf16 is, the gap belongs to bf16 on these weights (random routers'
near-ties flipping), not to vl2-jax; vl2-jax float32 against PyTorch float32 cross-checks the two
implementations at full size.
`--routing base` gives the preset base's routing (sigmoid scores, `noaux_tc`, renormalised weights
scaled by 2): small's sizes with base's routing, say, or the test preset through DeepseekV3.
`--layerwise` draws, runs and drops one decoder layer at a time (on the GPU or the CPU), so any depth
fits in one layer's memory: all of small's layers on a 24 GB CPU, base's on one H200. It also reports
each layer where vl2-jax's float32 hidden states part from PyTorch's (cosine < 0.9999) at new tokens,
with PyTorch's float32 router margin there (the k-th best expert's choice score less the next one's): a
near-tie flips under any change of summation order, float32's included. PyTorch's experts then run in
transformers' plain per-expert loop. Tiny (multi-head attention) is not covered: these classes
implement MLA only.

Prints one JSON line per result, then a short table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vl2_jax.config import PRESETS, Runtime


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the last axis: [..., N] x [..., N] -> [...]."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- jax: vl2-jax alone -----------------------------------------------------------------------------


def routed(fn, forced=None):
    """fn() run eagerly with the routers' (weights, ids) recorded, or replaced by `forced` ones, in the
    order the MoE layers ask: (fn's result, the routes)."""
    from vl2_jax.modules import moe

    routes, original = [], moe.route

    def route(logits, c, bias=None):
        out = forced.pop(0) if forced is not None else original(logits, c, bias)
        routes.append(out)
        return out

    moe.route = route
    try:
        with jax.disable_jit():
            return fn(), routes
    finally:
        moe.route = original


def run_jax(model: str, layers: int, tokens: int, same_weights: bool = False, attention: str = "plain") -> list[dict]:
    """vl2-jax alone: float32, bf16 and bf16 with float32's routing, one layer at a time (`jax` above)."""
    from vl2_jax.load import draw_like
    from vl2_jax.modules.language import DecoderLayer, LanguageModel, causal_mask

    lc = PRESETS[model].language
    layers = layers or lc.num_hidden_layers  # (main checks it is at most the model's depth)
    ids = np.random.default_rng(0).integers(100, lc.vocab_size, (1, tokens))
    positions, valid = jnp.arange(tokens)[None], jnp.ones((1, tokens), bool)
    mask = causal_mask(valid)
    streams = {"f32": jnp.float32, "bf16": jnp.bfloat16, "bf16_with_f32_routing": jnp.bfloat16}

    def weights(shapes_of, seed):
        """float32 draw (bf16-rounded with same_weights) -> {stream: params in its dtype}."""
        p = draw_like(jax.eval_shape(shapes_of), seed)
        if same_weights:  # the float32 reference computes on the bf16-rounded weights
            p = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), p)
        cast = {d: jax.tree.map(lambda a, d=d: a.astype(d), p) for d in set(streams.values())}
        return {name: cast[dtype] for name, dtype in streams.items()}

    def attention_of(stream):  # float32 always runs the plain path
        return attention if streams[stream] == jnp.bfloat16 else "plain"

    def lm(stream):
        return LanguageModel(lc, streams[stream], Runtime(moe="dense", attention=attention_of(stream)))

    def ends(module, ids):  # the embedding, final norm and LM head: the parameters outside the layers
        return module.head(module.embed(ids))

    def call(module, h):
        return module(h, positions, module.new_kv(h, positions), mask, valid)

    def apply_layer(i, stream, params, h, forced=None):
        module = DecoderLayer(lc, i, streams[stream], Runtime(moe="dense", attention=attention_of(stream)))
        return routed(functools.partial(module.apply, params, h, method=call), forced)

    outer = weights(functools.partial(lm("f32").init, jax.random.key(0), jnp.asarray(ids), method=ends), 0)
    x = {k: lm(k).apply(outer[k], jnp.asarray(ids), method="embed") for k in streams}
    rows = []
    # Layer by layer, each drawn, run in the three streams and dropped: small's 27 float32 layers (60 GB)
    # never sit in memory together.
    for i in range(layers):
        module = DecoderLayer(lc, i, jnp.float32, Runtime(moe="dense", attention="plain"))
        p = weights(functools.partial(module.init, jax.random.key(0), x["f32"], method=call), 1 + i)
        new, routes = {}, {}
        for k in ("f32", "bf16"):
            new[k], routes[k] = apply_layer(i, k, p[k], x[k])
        k = "bf16_with_f32_routing"
        new[k], _ = apply_layer(i, k, p[k], x[k], forced=list(routes["f32"]))
        x, p = new, None  # this layer's weights go before the next one's are drawn
        if routes["f32"]:
            (_, a), (_, b) = routes["f32"][0], routes["bf16"][0]
            same = [set(r) == set(s) for r, s in zip(np.asarray(a).tolist(), np.asarray(b).tolist())]
            rows.append({"model": model, "metric": "tokens_with_other_experts", "layer": i, "share": 1 - float(np.mean(same))})
    logits = {k: np.asarray(lm(k).apply(outer[k], x[k], method="head"), np.float32)[0] for k in streams}
    for name in ("bf16", "bf16_with_f32_routing"):
        cos = cosine(logits[name], logits["f32"])
        rows.append({"model": model, "metric": f"logits_cosine_{name}", "layers": layers, "tokens": tokens,
                     "reference_weights": "bf16" if same_weights else "float32", "bf16_attention": attention,
                     "min": float(cos.min()), "mean": float(cos.mean())})
    return rows


# --- torch: PyTorch beside vl2-jax -------------------------------------------------------------------

ROUTING = ("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor")  # what --routing base takes


def hf_config(lc):
    """A `LanguageConfig` -> transformers' `DeepseekV2Config` (softmax routing) or `DeepseekV3Config`
    (sigmoid `noaux_tc` routing); ValueError where neither class implements the preset."""
    v3 = lc.topk_method == "noaux_tc"
    unsupported = {
        "use_mla": not lc.use_mla,
        "scoring_func": lc.scoring_func != ("sigmoid" if v3 else "softmax"),
        "norm_topk_prob": not v3 and lc.norm_topk_prob and lc.num_experts_per_tok > 1,
        "topk_method": lc.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"),
        "moe_layer_freq": lc.moe_layer_freq != 1,
    }
    if any(unsupported.values()):
        bad = ", ".join(f"{k}={getattr(lc, k)!r}" for k, v in unsupported.items() if v)
        raise ValueError(f"transformers' DeepseekV2 and DeepseekV3 do not implement this preset's {bad}")
    import transformers

    common = dict(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        moe_intermediate_size=lc.moe_intermediate_size, num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.num_key_value_heads,
        n_shared_experts=lc.n_shared_experts, n_routed_experts=lc.n_routed_experts,
        num_experts_per_tok=lc.num_experts_per_tok, first_k_dense_replace=lc.first_k_dense_replace,
        n_group=lc.n_group, topk_group=lc.topk_group,
        routed_scaling_factor=lc.routed_scaling_factor, norm_topk_prob=lc.norm_topk_prob,
        q_lora_rank=lc.q_lora_rank, kv_lora_rank=lc.kv_lora_rank, qk_rope_head_dim=lc.qk_rope_head_dim,
        qk_nope_head_dim=lc.qk_nope_head_dim, v_head_dim=lc.v_head_dim, rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=lc.max_position_embeddings, initializer_range=0.02, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": lc.rope_theta},
    )
    if v3:  # DeepSeek's interleaved rotary pairs, as the official code (and vl2-jax) rotate them
        return transformers.DeepseekV3Config(**common, rope_interleave=True)
    return transformers.DeepseekV2Config(**common, topk_method=lc.topk_method)


def hf_class(config, name: str):
    """The class `name` ("DecoderLayer", "RMSNorm", ...) of the modeling module `config` belongs to."""
    import importlib

    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return getattr(module, type(config).__name__.removesuffix("Config") + name)


def draw_correction_bias(module) -> None:
    """normal(0.02), bf16-rounded, for every `noaux_tc` correction bias (a buffer, so not drawn with the
    parameters; zero in transformers' and vl2-jax's initialisations)."""
    import torch

    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer).mul(0.02).bfloat16().float())


def checkpoint_tensors(state: dict) -> dict:
    """transformers' state dict (torch tensors) -> DeepSeek-VL2 checkpoint names -> numpy (bf16 as
    ml_dtypes), splitting the stacked experts back into one tensor per expert."""
    import ml_dtypes
    import torch

    def host(t):
        t = t.detach().to("cpu")
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()

    out = {}
    for name, t in state.items():
        name = "language." + name if name.startswith("model.") else name.replace("lm_head", "language.lm_head")
        if name.endswith("experts.gate_up_proj"):  # [E, 2F, D]: gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = host(gate[e])
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = host(up[e])
        elif name.endswith("experts.down_proj"):  # [E, D, F]
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = host(t[e])
        else:
            out[name] = host(t)
    return out


def converted(cfg, tensors: dict, drop: int, dtype) -> dict:
    """Checkpoint-named arrays (consumed) -> vl2-jax parameters `{"params": ...}` on the device, through
    the conversion rules of `python -m convert`: the rules whose sources are all in `tensors`, each
    target's path less its first `drop` names (1: a language model's, 2: one decoder layer's)."""
    from vl2_jax.checkpoint import apply_rule, conversion_plan, set_path

    tree: dict = {}
    for rule in conversion_plan(cfg):
        if all(s in tensors for s in rule.source_names):
            for path, array in apply_rule(rule, [tensors.pop(s) for s in rule.source_names]):
                set_path(tree, path[drop:], jax.device_put(array.astype(dtype)))
    if tensors:
        raise SystemExit(f"error: {len(tensors)} tensors had no conversion rule, e.g. {sorted(tensors)[:3]}")
    return {"params": tree}


def flip_row(moe_layer: int, f32_ids: np.ndarray, bf16_ids: np.ndarray) -> dict:
    """The share of tokens whose set of chosen experts ([tokens, k] ids) differs between the two runs."""
    share = float(np.mean([set(a) != set(b) for a, b in zip(f32_ids.tolist(), bf16_ids.tolist())]))
    return {"metric": "torch_tokens_with_other_experts", "moe_layer": moe_layer, "share": share}


def torch_runs(lc, ids: np.ndarray, device: str) -> tuple[dict, list[dict], dict]:
    """PyTorch float32 and bf16 on the same bf16-rounded weights -> (logits by run, expert flips per
    MoE layer, the bf16 weights under checkpoint names)."""
    import torch

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")  # no TF32 in the float32 reference
    config = hf_config(lc)
    with torch.device(device):
        model = hf_class(config, "ForCausalLM")._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    draw_correction_bias(model)
    # `model.to(bf16)` would round the rotary frequencies too, an error that grows with position and that
    # neither the official code nor vl2-jax makes (both compute the angles in float32): keep them float32
    rotary = {name: b.clone() for name, b in model.named_buffers() if name.endswith("inv_freq")}
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    routes: list = []
    hooks = [g.register_forward_hook(lambda m, args, out: routes.append(out[2].cpu().numpy())) for g in gates]
    logits = {}
    x = torch.tensor(ids, device=device)
    for name, dtype in (("torch_f32", torch.float32), ("torch_bf16", torch.bfloat16)):
        model.to(dtype)
        for path, frequencies in rotary.items():
            owner, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(owner), leaf, frequencies)
        with torch.no_grad():
            logits[name] = model(x).logits.float().cpu().numpy()[0]
    for h in hooks:
        h.remove()
    n = len(gates)
    flips = [flip_row(i, routes[i], routes[n + i]) for i in range(n)]
    tensors = checkpoint_tensors(model.state_dict())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits, flips, tensors


def jax_runs(cfg, tensors: dict, ids: np.ndarray) -> dict:
    """vl2-jax's language model, jitted as a full forward, in float32 and in bf16 on the same weights."""
    from vl2_jax.modules.language import LanguageModel

    def forward(dtype):
        def run(module, ids_BT):
            t = ids_BT.shape[1]
            return module(module.embed(ids_BT), jnp.arange(t)[None], jnp.ones_like(ids_BT, bool))

        module = LanguageModel(cfg.language, dtype, Runtime())
        return jax.jit(lambda params, ids_BT: module.apply(params, ids_BT, method=run))

    params16 = converted(cfg, tensors, 1, jnp.bfloat16)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params16)
    logits = {"jax_f32": np.asarray(forward(jnp.float32)(params32, ids))[0]}
    del params32
    logits["jax_bf16"] = np.asarray(forward(jnp.bfloat16)(params16, ids))[0]
    return logits


def router_margins(lc, logits: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Per token, how far the k-th best expert's choice score is above the next one's ([tokens]), from
    router logits [tokens, experts] (and `noaux_tc`'s correction bias [experts]); groups are ignored
    (exact for small and base, one group each)."""
    if lc.scoring_func == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits)) + (0 if bias is None else bias)
    ranked = -np.sort(-scores, axis=-1)
    k = lc.num_experts_per_tok
    return ranked[:, k - 1] - ranked[:, k]


def layerwise_runs(cfg, ids: np.ndarray, device: str) -> tuple[dict, list[dict]]:
    """The four runs one decoder layer at a time: each layer is drawn in PyTorch on `device` (the same
    distribution as `torch_runs`, though not the same draw), rounded to bf16, run by both frameworks in
    both dtypes and dropped, so all of small's 27 layers fit a CPU's memory and base's 30 one GPU's.
    vl2-jax's layers run jitted, one compiled function per layer kind and dtype. -> (logits by run,
    PyTorch's expert flips, then the layers where vl2-jax's float32 parts from PyTorch's)."""
    import torch

    from vl2_jax.modules.language import DecoderLayer, LanguageModel, causal_mask

    lc = cfg.language
    config = hf_config(lc)
    config._attn_implementation = "eager"
    rms_norm = hf_class(config, "RMSNorm")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    dtypes = {"f32": (torch.float32, jnp.float32), "bf16": (torch.bfloat16, jnp.bfloat16)}

    def drawn(module):  # float32, normal(0.02) weights and unit norm scales, rounded to bf16
        with torch.no_grad():
            for prm in module.parameters():
                prm.normal_(0.0, 0.02)
            for m in module.modules():
                if isinstance(m, rms_norm):
                    m.weight.fill_(1.0)
            for prm in module.parameters():
                prm.copy_(prm.bfloat16().float())
        draw_correction_bias(module)
        return module.eval()

    def jax_params(prefix: str, names: dict, drop: int) -> dict:  # torch tensors -> vl2-jax, bf16
        return converted(cfg, checkpoint_tensors({prefix + k: v.to(torch.bfloat16) for k, v in names.items()}),
                         drop, jnp.bfloat16)

    t = ids.shape[1]
    x_t = torch.tensor(ids, device=device)
    pos_t = torch.arange(t, device=device)[None]
    rotary = hf_class(config, "RotaryEmbedding")(config).to(device)
    # Angles computed in float32 and given in the layer's dtype, as the models themselves pass them
    # (DeepseekV2's complex form stays float32 either way).
    rope = {k: rotary(torch.zeros(1, dtype=td, device=device), pos_t) for k, (td, _) in dtypes.items()}
    positions, valid = jnp.arange(t)[None], jnp.ones((1, t), bool)
    mask = causal_mask(valid)

    with torch.device(device):
        ends = drawn(torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(lc.vocab_size, lc.hidden_size),
                                          "norm": rms_norm(lc.hidden_size, lc.rms_norm_eps),
                                          "lm_head": torch.nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)}))
    named = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in ends.state_dict().items()}
    outer_j = jax_params("", named, 1)
    lm = {k: LanguageModel(lc, jd, Runtime()) for k, (_, jd) in dtypes.items()}
    cast = {k: jax.tree.map(lambda a, jd=jd: a.astype(jd), outer_j) for k, (_, jd) in dtypes.items()}
    h = {"torch_" + k: ends.embed_tokens(x_t).to(td).detach() for k, (td, _) in dtypes.items()}
    h |= {"jax_" + k: lm[k].apply(cast[k], jnp.asarray(ids), method="embed") for k in dtypes}

    compiled = {}

    def jax_layer(i, k):
        kind = lc.is_moe_layer(i)
        if (kind, k) not in compiled:
            module = DecoderLayer(lc, i, dtypes[k][1], Runtime())
            compiled[kind, k] = jax.jit(lambda prm, x, module=module: module.apply(
                prm, x, method=lambda m, x: m(x, positions, m.new_kv(x, positions), mask, valid)))
        return compiled[kind, k]

    flips, parted, apart = [], [], np.zeros(t, bool)
    for i in range(lc.num_hidden_layers):
        with torch.device(device):
            layer = drawn(hf_class(config, "DecoderLayer")(config, i))
        params = jax_params(f"model.layers.{i}.", layer.state_dict(), 2)
        routes: list = []  # (router logits, expert ids) of the float32 run, then of the bf16 run
        hook = None
        if lc.is_moe_layer(i):
            hook = layer.mlp.gate.register_forward_hook(
                lambda m, a, out, r=routes: r.append((out[0].float().cpu().numpy(), out[2].cpu().numpy())))
        for k, (td, jd) in dtypes.items():
            layer.to(td)
            causal = torch.full((t, t), torch.finfo(td).min, dtype=td, device=device).triu(1)[None, None]
            with torch.no_grad():
                h["torch_" + k] = layer(h["torch_" + k], attention_mask=causal, position_ids=pos_t,
                                        position_embeddings=rope[k])
            h["jax_" + k] = jax_layer(i, k)(jax.tree.map(lambda a, jd=jd: a.astype(jd), params), h["jax_" + k])
        if hook is not None:
            hook.remove()
            flips.append(flip_row(len(flips), routes[0][1], routes[1][1]))
        # Where the two float32 runs part: which tokens' hidden states first differ here, and how close
        # PyTorch's router came to a tie on them (a near-tie flips under any change of summation order).
        torch_f32 = h["torch_f32"].float().cpu().numpy()[0]
        now = cosine(torch_f32, np.asarray(h["jax_f32"], np.float32)[0]) < 0.9999
        new = now & ~apart
        if new.any():
            row = {"metric": "f32_tokens_apart", "layer": i, "tokens": int(now.sum()), "new": int(new.sum())}
            if routes:
                bias = getattr(layer.mlp.gate, "e_score_correction_bias", None)
                margins = router_margins(lc, routes[0][0], None if bias is None else bias.float().cpu().numpy())
                row |= {"new_router_margins": [float(m) for m in margins[new]],
                        "median_router_margin": float(np.median(margins))}
            parted.append(row)
        apart |= now
        del layer, params
        print(f"layer {i} done", file=sys.stderr, flush=True)
    logits = {}
    for k, (td, _) in dtypes.items():
        ends.to(td)
        with torch.no_grad():
            logits["torch_" + k] = ends.lm_head(ends.norm(h["torch_" + k])).float().cpu().numpy()[0]
        logits["jax_" + k] = np.asarray(lm[k].apply(cast[k], h["jax_" + k], method="head"))[0]
    return logits, flips + parted


def preset(model: str, layers: int = 0, routing: str = "preset"):
    """The preset's `VL2Config`, cut to its first `layers` decoder layers (0: all) and, with routing
    "base", given base's routing (`ROUTING`)."""
    cfg = PRESETS[model]
    changes = {"num_hidden_layers": layers} if layers else {}
    if routing == "base":
        changes |= {k: getattr(PRESETS["base"].language, k) for k in ROUTING}
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, **changes))


def run_torch(model: str, tokens: int, device: str, layers: int = 0, layerwise: bool = False,
              routing: str = "preset") -> list[dict]:
    """PyTorch's float32 and bf16 beside vl2-jax's on the same weights (`torch` above)."""
    import torch
    import transformers

    cfg = preset(model, layers, routing)
    ids = np.random.default_rng(0).integers(100, cfg.language.vocab_size, (1, tokens))
    if layerwise:
        logits, flips = layerwise_runs(cfg, ids, device)
    else:
        logits, flips, tensors = torch_runs(cfg.language, ids, device)
        logits |= jax_runs(cfg, tensors, ids)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "jax": jax.__version__,
                "device": jax.devices()[0].device_kind}
    tag = {"model": model} | ({"routing": routing} if routing != "preset" else {})
    rows = [tag | r for r in flips]
    pairs = [("torch_bf16", "torch_f32"), ("jax_f32", "torch_f32"), ("jax_bf16", "torch_f32"), ("jax_bf16", "jax_f32")]
    for a, b in pairs:
        cos = cosine(logits[a], logits[b])
        rows.append(tag | {"metric": f"{a}_vs_{b}_logits_cosine", "tokens": tokens,
                     "layers": cfg.language.num_hidden_layers,
                     "min": float(cos.min()), "mean": float(cos.mean()),
                     "argmax_agreement": float((logits[a].argmax(-1) == logits[b].argmax(-1)).mean()), **versions})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="against", required=True, metavar="{jax,torch}")
    j = sub.add_parser("jax", help="vl2-jax alone: float32, bf16, and bf16 with float32's routing")
    j.add_argument("--model", default="small", choices=sorted(PRESETS), help="preset")
    j.add_argument("--layers", type=int, default=4, help="decoder layers kept, 0 for all (drawn and run one at a time)")
    j.add_argument("--tokens", type=int, default=48)
    j.add_argument("--same-weights", action="store_true",
                   help="float32 reference on the bf16-rounded weights: only the arithmetic differs")
    j.add_argument("--attention", default="plain", choices=["plain", "xla", "cudnn"],
                   help="bf16's attention (float32 always runs the plain path): xla is the fused form cuDNN runs")
    t = sub.add_parser("torch", help="PyTorch's float32 and bf16 beside vl2-jax's, on the same weights")
    t.add_argument("--model", default="small", choices=sorted(PRESETS), help="preset: small, base or test (MLA)")
    t.add_argument("--tokens", type=int, default=1042, help="random text prompt length (1042: the image prompt's)")
    t.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    t.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all), at the real widths")
    t.add_argument("--layerwise", action="store_true",
                   help="draw, run and drop one layer at a time, so any depth fits (a different draw)")
    t.add_argument("--routing", default="preset", choices=["preset", "base"],
                   help="base: base's sigmoid noaux_tc routing on this preset's sizes")
    args = p.parse_args(argv)
    parser = j if args.against == "jax" else t
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    depth = PRESETS[args.model].language.num_hidden_layers
    if not 0 <= args.layers <= depth:
        parser.error(f"--layers must be 0 (all) to {depth} for {args.model} (got {args.layers})")
    if args.against == "jax":
        rows = run_jax(args.model, args.layers, args.tokens, args.same_weights, args.attention)
    else:
        try:
            hf_config(preset(args.model, args.layers, args.routing).language)
        except (ValueError, ImportError, AttributeError) as e:  # a transformers without DeepseekV2 or V3
            parser.error(str(e))
        try:
            import torch
        except ImportError as e:
            parser.error(f"needs torch, which vl2-jax does not install ({e})")
        # PyTorch runs first in this process: JAX must not take the GPU's memory when it starts
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = run_torch(args.model, args.tokens, device, args.layers, args.layerwise, args.routing)
    for r in rows:
        print(json.dumps(r), flush=True)
    for r in rows:
        print(" | ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("torch", "transformers", "jax", "device")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
