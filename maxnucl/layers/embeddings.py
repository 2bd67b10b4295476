"""Token embedding (shared with the output projection) and rotary position embedding."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from maxnucl.layers.initializers import param_with_axes


class Embedder(nn.Module):
  """Input lookup with the `[vocab, d]` table that the output projection shares
  (`maxnucl.models.decoder.output_logits`)."""
  vocab_size: int
  d_model: int
  input_scale: str  # "sqrt_d" (Gemma: x * sqrt(d), sqrt(d) rounded to dtype) or "none" (PaLM)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_stddev: float = 1.0  # maxnucl.models.decoder.embedding_init_stddev

  def setup(self):
    stddev = self.init_stddev
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


def rope_inverse_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """The H/2 rotation frequencies (float32), scaled as `scaling` says (ModelConfig.rope_scaling):
  ("linear", f) divides every frequency by f (Gemma-3's global layers); ("llama3", f, low, high,
  L0) divides those with wavelength above L0/low by f, keeps those below L0/high, and
  interpolates smoothly between (Llama-3.1; Hugging Face's `_compute_llama3_parameters`)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
  if scaling is None:
    return inv_freq
  kind, factor = scaling[0], np.float32(scaling[1])
  if kind == "linear":
    return (inv_freq / factor).astype(np.float32)
  low, high, original = (np.float32(v) for v in scaling[2:])
  wavelength = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelength < original / high) & ~(wavelength > original / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, theta: float, scaling=None):
  """Half-split rotary embedding (`rotate_half`, not interleaved); tables in float32.

  x: [B, T, N, H]; positions: [B, T] int; `scaling`: see rope_inverse_frequencies.
  """
  inv_freq = jnp.asarray(rope_inverse_frequencies(x.shape[-1], theta, scaling))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
