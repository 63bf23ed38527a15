"""The model with `jax.checkpoint` (Flax's `nn.remat`) around each decoder layer, for training.

The backward pass then keeps one residual stream [B, T, D] per layer and recomputes the layer's
inside (attention scores [B, H, T, T], the dense MoE dispatch's [N, E, D]) from it, instead of keeping
them all. The subclasses only swap the layer class in `setup`: the parameter tree, the arithmetic
and so the values are the model's own (`modules/` is not touched); the key-entry projection
(`DecoderLayer.new_kv`, called outside the layer's `__call__`) is not rematerialised.
"""

from __future__ import annotations

from flax import linen as nn

from vl2_jax.modules.language import DecoderLayer, LanguageModel
from vl2_jax.modules.layers import RMSNorm, normal_init
from vl2_jax.modules.projector import Projector
from vl2_jax.modules.vision import VisionTransformer
from vl2_jax.modules.vl2 import VL2

RematDecoderLayer = nn.remat(DecoderLayer)


class RematLanguageModel(LanguageModel):
    """`LanguageModel` whose layers are rematerialised in the backward pass."""

    def setup(self):
        c = self.cfg
        self.embed_table = self.param("embed", normal_init(), (c.vocab_size, c.hidden_size), self.dtype)
        self.layers = [RematDecoderLayer(c, i, self.dtype, self.runtime) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)
        self.lm_head = self.param("lm_head", normal_init(), (c.hidden_size, c.vocab_size), self.dtype)


class RematVL2(VL2):
    """`VL2` over `RematLanguageModel`."""

    def setup(self):
        c = self.cfg
        self.vision = VisionTransformer(c.vision, self.dtype, self.runtime)
        self.projector = Projector(c.projector, c.vision.grid, self.dtype)
        d = c.language.hidden_size
        self.image_newline = self.param("image_newline", normal_init(), (d,), self.dtype)
        self.view_separator = self.param("view_separator", normal_init(), (d,), self.dtype)
        self.language = RematLanguageModel(c.language, self.dtype, self.runtime)
