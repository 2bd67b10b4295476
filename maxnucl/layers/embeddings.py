"""Token embedding (shared with the output projection) and rotary position embedding."""

import flax.linen as nn
import jax.numpy as jnp

from maxnucl.layers.initializers import param_with_axes


class Embedder(nn.Module):
  """Input lookup with the `[vocab, d]` table that the output projection shares
  (`maxnucl.models.decoder.output_logits`)."""
  vocab_size: int
  d_model: int
  input_scale: str  # "sqrt_d" (Gemma: x * sqrt(d), sqrt(d) rounded to dtype) or "none" (PaLM)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    # Unit-scale activations at both ends: Gemma multiplies the lookup by sqrt(d) and leaves the
    # output unscaled; PaLM leaves the lookup unscaled and divides the logits by sqrt(d).
    stddev = self.d_model ** -0.5 if self.input_scale == "sqrt_d" else 1.0
    self.embedding = param_with_axes(self, "embedding", nn.initializers.normal(stddev=stddev),
                                     (self.vocab_size, self.d_model), self.param_dtype,
                                     ("vocab", "embed"))

  def encode(self, tokens):
    """[B, T] int -> [B, T, d]."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    if self.input_scale == "sqrt_d":
      # Gemma rounds sqrt(d) to the activation dtype first (bf16: sqrt(3584) -> 59.75).
      x = x * jnp.asarray(self.d_model ** 0.5, dtype=self.dtype)
    return x


def apply_rope(x, positions, theta: float):
  """Half-split rotary embedding (`rotate_half`, not interleaved); tables in float32.

  x: [B, T, N, H]; positions: [B, T] int.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
