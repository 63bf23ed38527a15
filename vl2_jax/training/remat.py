"""The model with `jax.checkpoint` (Flax's `nn.remat`) around each decoder layer, for training.

The backward pass then keeps one residual stream [B, T, D] per layer and recomputes the layer's
inside (attention scores [B, H, T, T], the MoE dispatch's expert activations) from it, instead of keeping
them all. The subclasses only swap the classes the modules build (`LanguageModel.layer_class`,
`VL2.language_class`): the parameter tree, the arithmetic and so the values are the model's own; the
key-entry projection (`DecoderLayer.new_kv`, called outside the layer's `__call__`) is not rematerialised.
"""

from __future__ import annotations

from flax import linen as nn

from vl2_jax.modules.language import DecoderLayer, LanguageModel
from vl2_jax.modules.vl2 import VL2


class RematLanguageModel(LanguageModel):
    """`LanguageModel` whose layers are rematerialised in the backward pass."""

    layer_class = nn.remat(DecoderLayer, methods=["__call__", "with_router"])


class RematVL2(VL2):
    """`VL2` over `RematLanguageModel`."""

    language_class = RematLanguageModel
