"""The gated feed-forward block: W( act(U x) * (V x) ) with the NUCL paper's U, V, W."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxnucl import sharding
from maxnucl import ffn
from maxnucl.layers.initializers import fan_in_normal, param_with_axes

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU (Gemma-2)
    "silu": jax.nn.silu,  # SwiGLU (PaLM)
}


class GatedMLP(nn.Module):
  """Gated FFN with inner width m.

  Parameters (the NUCL paper's notation, Fig. 1):
    gate  U  [d, m]  logical ("embed", "mlp")
    up    V  [d, m]  logical ("embed", "mlp")
    out   W  [m, d]  logical ("mlp", "embed"); row j = outgoing connections of inner neuron j
  The inner activation a = act(x U) * (x V) [B, T, m] is what pruning scores and the loss proxy
  read: it is sown as `intermediates/inner` and passes through `perturb("inner")` so that a
  gradient with respect to it can be taken.
  """
  width: int
  activation: str = "gelu_tanh"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, inner_scale=None):
    """x: [B, T, d] -> [B, T, d]; `inner_scale` (broadcastable to [B, T, m]) multiplies a."""
    d = x.shape[-1]
    gate = param_with_axes(self, ffn.GATE, fan_in_normal((0,)), (d, self.width), self.param_dtype,
                           ("embed", "mlp"))
    up = param_with_axes(self, ffn.UP, fan_in_normal((0,)), (d, self.width), self.param_dtype,
                         ("embed", "mlp"))
    out = param_with_axes(self, ffn.OUT, fan_in_normal((0,)), (self.width, d), self.param_dtype,
                          ("mlp", "embed"))
    axes = ("activation_batch", "activation_length", "activation_mlp")
    gate_act = sharding.constrain(jnp.einsum("BTD,DM->BTM", x, gate.astype(self.dtype)), axes)
    up_act = sharding.constrain(jnp.einsum("BTD,DM->BTM", x, up.astype(self.dtype)), axes)
    inner = ACTIVATIONS[self.activation](gate_act) * up_act
    if inner_scale is not None:
      inner = inner * inner_scale.astype(inner.dtype)
    self.sow("intermediates", "inner", inner)
    inner = self.perturb("inner", inner)
    return jnp.einsum("BTM,MD->BTD", inner, out.astype(self.dtype))
