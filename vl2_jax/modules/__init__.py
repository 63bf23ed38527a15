"""DeepSeek-VL2 as pure-functional Flax (Linen) modules.

Parameters are an explicit pytree (`{"params": ...}`) passed to `apply`; no module keeps state. Weights
are stored in einsum-natural layout (input axes first, heads split out, experts stacked); every transpose
from the PyTorch `[out, in]` layout happens once, in `vl2_jax.checkpoint`.

Dimension legend, used in einsum strings, variable suffixes (`x_BTD`) and docstrings:

    B  batch                      I  image tiles (ViT batch)
    T  query length               P  patches per tile (27 * 27 at 384 px)
    S  key length                 C  ViT width
    D  model width                F  MLP width (dense, expert or ViT)
    H  attention heads            E  routed experts
    G  key/value heads (MHA)      X  experts chosen per token (top-k)
    K  head dim (qk; nope part    R  MLA latent rank (kv_lora_rank)
       for MLA)                   Q  MLA query LoRA rank
    J  rope dim (MLA)             V  vocabulary
    U  value head dim (MLA)       N  flattened tokens (B * T)
    W  two stacked projections    M  rows per expert (grouped MoE) or
       (gate|up, key|value)          per block (blocked MoE)
    A  token-expert pairs (N * X) Z  blocks (blocked MoE)
"""
