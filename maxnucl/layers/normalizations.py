"""RMSNorm in float32, with Gemma's `(1 + scale)` convention or a plain `scale`."""

import flax.linen as nn
import jax.numpy as jnp

from maxnucl.layers.initializers import param_with_axes


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)` computed in float32, cast back to x's dtype.

  `offset_scale=True` (Gemma-2, HF and DeepMind checkpoints): the stored scale is initialised to
  zeros and multiplied as (1 + scale).  `offset_scale=False` (PaLM-style): initialised to ones and
  used as is.
  """
  eps: float = 1e-6
  offset_scale: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset_scale else nn.initializers.ones
    scale = param_with_axes(self, "scale", init, (x.shape[-1],), self.param_dtype, ("norm",))
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                           + self.eps))
    scale32 = scale.astype(jnp.float32)
    return (normed * (1.0 + scale32 if self.offset_scale else scale32)).astype(x.dtype)
