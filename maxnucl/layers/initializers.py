"""Parameter creation with logical axis names declared next to the shape."""

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                    dtype: jnp.dtype, logical_axes: Sequence[str]):
  """`module.param(name, ...)` whose value is boxed with its logical axis names.

  `maxnucl.models.init` unboxes the tree (params are plain arrays); `maxnucl.models.logical_axes`
  reads the names back to derive shardings.
  """
  if len(shape) != len(logical_axes):
    raise ValueError(f"param {name!r}: shape {tuple(shape)} and logical axes "
                     f"{tuple(logical_axes)} differ in rank")
  return module.param(name, nn.with_logical_partitioning(init, tuple(logical_axes)),
                      tuple(shape), dtype)


def fan_in_normal(fan_in_axes: Sequence[int]) -> Callable:
  """Truncated-normal init with variance 1/fan_in, fan-in taken over `fan_in_axes`."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=tuple(fan_in_axes),
                                          out_axis=())
