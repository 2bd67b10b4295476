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
  """Truncated-normal init with standard deviation 1/sqrt(fan_in), fan_in = the product of the
  dimensions on `fan_in_axes` (the axes an input is contracted over); every other axis is an
  output axis.

  JAX's `variance_scaling` counts axes that are neither in nor out as a convolution's receptive
  field and multiplies them into the fan-in, so the output axes must be named: a `[d, m]` kernel
  with `out_axis=()` would start with std 1/sqrt(d * m).  MaxText's `DenseGeneral` does the same
  (`kernel_in_axis` = the contracted axes, `kernel_out_axis` = the feature axes).
  """
  fan_in_axes = tuple(fan_in_axes)

  def init(key, shape, dtype=jnp.float32):
    in_axes = tuple(axis % len(shape) for axis in fan_in_axes)
    out_axes = tuple(axis for axis in range(len(shape)) if axis not in in_axes)
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes,
                                            out_axis=out_axes)(key, shape, dtype)

  return init
