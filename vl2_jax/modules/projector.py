"""`downsample_mlp_gelu` projector: ViT features of one tile -> language-model embeddings.

The g x g patch grid is zero-padded at the bottom/right to an even size, every 2x2 block is
concatenated channel-major (channel index `c * 4 + di * 2 + dj`, as `F.unfold`), then Linear, exact
(erf) GELU, Linear.

Parameter layout (`params["projector"]`): w0 [4C, F], b0 [F], w1 [F, D], b1 [D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vl2_jax.config import ProjectorConfig
from vl2_jax.modules.layers import einsum, normal_init


def unfold_2x2(x_IPC: jax.Array, grid: int) -> jax.Array:
    """[I, g*g, C] -> [I, ceil(g/2)^2, 4C], the reference's pad + `F.unfold(kernel=2, stride=2)`."""
    n, _, c = x_IPC.shape
    x = x_IPC.reshape(n, grid, grid, c)
    pad = grid % 2
    x = jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0)))
    h = (grid + pad) // 2
    x = x.reshape(n, h, 2, h, 2, c)  # [I, y, di, x, dj, C]
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [I, y, x, C, di, dj]
    return x.reshape(n, h * h, c * 4)


class Projector(nn.Module):
    """features [I, P, C] -> embeddings [I, h*w, D]."""

    cfg: ProjectorConfig
    grid: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_IPC: jax.Array) -> jax.Array:
        c = self.cfg
        c4 = c.input_dim * c.downsample_ratio**2
        w0 = self.param("w0", normal_init(), (c4, c.hidden_dim), self.dtype)
        b0 = self.param("b0", nn.initializers.zeros, (c.hidden_dim,), self.dtype)
        w1 = self.param("w1", normal_init(), (c.hidden_dim, c.n_embed), self.dtype)
        b1 = self.param("b1", nn.initializers.zeros, (c.n_embed,), self.dtype)
        x = unfold_2x2(x_IPC.astype(self.dtype), self.grid)
        x = jax.nn.gelu(einsum("IPc,cF->IPF", x, w0) + b0, approximate=False)
        return einsum("IPF,FD->IPD", x, w1) + b1
