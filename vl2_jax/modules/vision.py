"""SigLIP ViT (SO400M/14 at 384 px in the released models): patch conv, position embedding, pre-norm
blocks, final LayerNorm. No class token and no pooling head (`vision.attn_pool.*` is unused upstream).

Attention runs as cuDNN flash attention where it can (NVIDIA GPU, bf16/f16; 9.4 against 14.0 ms for
the 5-tile tower on an H200, BENCHMARKS.md), else as the plain einsum softmax in float32 (CPU, TPU,
float32 parity); `Runtime.attention` picks one explicitly.

Parameter layout (`params["vision"]`):
    patch_w [3, p, p, C], patch_b [C], pos_embed [P, C]
    block_{i}: norm1, norm2 ({scale, bias} [C]); qkv_w [C, 3, H, K], qkv_b [3, H, K];
               out_w [H, K, C], out_b [C]; fc1_w [C, F], fc1_b [F]; fc2_w [F, C], fc2_b [C]
    norm: {scale, bias} [C]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import Runtime, VisionConfig
from vl2_jax.kernels import cudnn_attention_usable
from vl2_jax.modules.layers import LayerNorm, dot_product_attention, einsum, normal_init
from vl2_jax.processor import PixelNorm, pixel_table


def normalize_pixels(pixels_NSS3: jax.Array, norm: PixelNorm) -> jax.Array:
    """uint8 pixels [..., S, S, 3] -> the reference's normalised tiles [..., 3, S, S] float32, on the device.

    A lookup in `processor.pixel_table(norm)` (a constant of the compiled program), so the device gives
    the processor's bits: XLA would turn a division by a constant into a multiplication by its
    reciprocal, which changes last bits. `norm` is static: (mean, std) or None.
    """
    flat = pixels_NSS3.astype(jnp.int32) + 256 * jnp.arange(3, dtype=jnp.int32)  # level + 256 * channel
    return jnp.moveaxis(jnp.asarray(pixel_table(norm)).reshape(-1)[flat], -1, -3)


def attend_plain(q_IPHK, k_IQHK, v_IQHK) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v with the softmax in float32: [I, P, H, K]."""
    scale = jnp.asarray(q_IPHK.shape[-1] ** -0.5, q_IPHK.dtype)
    scores = einsum("IPHK,IQHK->IHPQ", q_IPHK * scale, k_IQHK)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v_IQHK.dtype)
    return einsum("IHPQ,IQHK->IPHK", probs, v_IQHK)


def attend(q_IPHK, k_IQHK, v_IQHK, runtime: Runtime = Runtime()) -> jax.Array:
    """Full (unmasked) attention over the patches of each tile, by `runtime.attention` (one of
    `vl2_jax.config.ATTENTION_IMPLS`; "xla" is `jax.nn.dot_product_attention`'s XLA form; "auto" takes
    cuDNN only where `runtime.kernels` allows)."""
    impl = runtime.attention
    if impl in ("cudnn", "xla"):
        return dot_product_attention(q_IPHK, k_IQHK, v_IQHK, impl)
    if impl == "auto" and runtime.kernels and cudnn_attention_usable(q_IPHK.dtype, q_IPHK.shape[-1]):
        try:
            return dot_product_attention(q_IPHK, k_IQHK, v_IQHK, "cudnn")
        except (RuntimeError, NotImplementedError, ValueError):  # no cuDNN, or a GPU it does not support
            pass
    return attend_plain(q_IPHK, k_IQHK, v_IQHK)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    @nn.compact
    def __call__(self, x_IPC: jax.Array) -> jax.Array:
        c = self.cfg
        init = normal_init()
        h = LayerNorm(c.width, c.layer_norm_eps, self.dtype, name="norm1")(x_IPC)
        qkv_w = self.param("qkv_w", init, (c.width, 3, c.heads, c.head_dim), self.dtype)
        qkv_b = self.param("qkv_b", nn.initializers.zeros, (3, c.heads, c.head_dim), self.dtype)
        qkv = einsum("IPC,CZHK->ZIPHK", h, qkv_w) + qkv_b[:, None, None]
        attn = attend(qkv[0], qkv[1], qkv[2], self.runtime)
        out_w = self.param("out_w", init, (c.heads, c.head_dim, c.width), self.dtype)
        out_b = self.param("out_b", nn.initializers.zeros, (c.width,), self.dtype)
        x_IPC = x_IPC + einsum("IPHK,HKC->IPC", attn, out_w) + out_b

        h = LayerNorm(c.width, c.layer_norm_eps, self.dtype, name="norm2")(x_IPC)
        fc1_w = self.param("fc1_w", init, (c.width, c.mlp_dim), self.dtype)
        fc1_b = self.param("fc1_b", nn.initializers.zeros, (c.mlp_dim,), self.dtype)
        fc2_w = self.param("fc2_w", init, (c.mlp_dim, c.width), self.dtype)
        fc2_b = self.param("fc2_b", nn.initializers.zeros, (c.width,), self.dtype)
        h = jax.nn.gelu(einsum("IPC,CF->IPF", h, fc1_w) + fc1_b, approximate=True)  # GELU tanh, as SigLIP
        return x_IPC + einsum("IPF,FC->IPC", h, fc2_w) + fc2_b


class VisionTransformer(nn.Module):
    """images [I, 3, S, S] (normalised pixels) -> features [I, P, C]."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    runtime: Runtime = Runtime.plain()

    @nn.compact
    def __call__(self, images_I3SS: jax.Array) -> jax.Array:
        c = self.cfg
        p, g = c.patch_size, c.grid
        patch_w = self.param("patch_w", normal_init(), (3, p, p, c.width), self.dtype)
        patch_b = self.param("patch_b", nn.initializers.zeros, (c.width,), self.dtype)
        pos_embed = self.param("pos_embed", normal_init(), (c.num_patches, c.width), self.dtype)

        # A stride-p conv without padding ignores the last S - g*p pixels (6 at 384 px with p = 14).
        x = images_I3SS[:, :, : g * p, : g * p].astype(self.dtype)
        x = x.reshape(x.shape[0], 3, g, p, g, p)
        x_IPC = einsum("Icyhxw,chwC->IyxC", x, patch_w)
        x_IPC = x_IPC.reshape(x.shape[0], g * g, c.width) + patch_b + pos_embed
        for i in range(c.layers):
            x_IPC = VisionBlock(c, self.dtype, self.runtime, name=f"block_{i}")(x_IPC)
        return LayerNorm(c.width, c.layer_norm_eps, self.dtype, name="norm")(x_IPC)
