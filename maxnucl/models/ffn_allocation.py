"""Per-layer FFN widths at an equal FFN parameter budget (layer-wise FFN allocation).

Ikeda et al. 2025 (*Layerwise Importance Analysis of Feed-Forward Networks in Transformer-based
Language Models*) keep the total FFN parameter count of a model, remove the FFNs of some layers
and widen the others; concentrating the FFNs in the middle ~70% of consecutive layers beat the
uniform model.  `allocate_ffn_widths` produces such widths for any depth, as a list usable as
`ModelConfig.ffn_widths`:

    widths = allocate_ffn_widths(26, 9216)                    # Gemma-2 2B depth and width
    widths[:5], widths[21:]      # [0, 0, 0, 0, 13312] [13312, 0, 0, 0, 0]; sum(widths) == 26 * 9216

Every FFN matrix (U, V [d, m_i]; W [m_i, d]) is linear in its width, so an equal sum of widths is
an equal FFN parameter count.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Union

import gin

from maxnucl.models.config import ModelConfig

# Where the block of FFN layers sits; "uniform" keeps every layer at base_width.
BLOCK_POSITIONS = ("first", "middle", "last")
SCHEMES = ("uniform",) + BLOCK_POSITIONS


def _positive_int(value, name: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} = {value!r}; expected an integer >= {minimum}")
  return int(value)  # a Python int: ModelConfig.ffn_widths takes no numpy integers


def _block_size(num_layers: int, fraction: float) -> int:
  """fraction * num_layers rounded to the nearest integer, halves up (0.7 * 15 = 10.5 -> 11;
  the small tolerance keeps float products like 10.499999999999998 at their intended half)."""
  return math.floor(fraction * num_layers + 0.5 + 1e-9)


def ffn_block(num_layers: int, fraction: float = 0.7, scheme: str = "middle") -> range:
  """The layer indices that keep an FFN: `round(fraction * num_layers)` consecutive layers at the
  start ("first"), the end ("last"), or the middle ("middle"; where the outer layers cannot split
  evenly, the extra one is at the top: 4 layers at fraction 0.7 -> layers 0, 1, 2)."""
  num_layers = _positive_int(num_layers, "num_layers")
  if scheme not in BLOCK_POSITIONS:
    raise ValueError(f"scheme = {scheme!r} has no block of FFN layers; expected one of "
                     f"{BLOCK_POSITIONS}")
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
      0.0 < fraction <= 1.0):
    raise ValueError(f"fraction = {fraction!r}; expected a number in (0, 1]")
  size = _block_size(num_layers, fraction)
  if size == 0:
    raise ValueError(f"fraction = {fraction!r} of num_layers = {num_layers} rounds to zero "
                     f"layers with an FFN; expected a fraction >= {0.5 / num_layers:.3g}")
  start = {"first": 0, "middle": (num_layers - size) // 2, "last": num_layers - size}[scheme]
  return range(start, start + size)


@gin.configurable(module="maxnucl.models")
def allocate_ffn_widths(cfg_or_num_layers: Union[ModelConfig, int] = gin.REQUIRED,
                        base_width: int | None = None, scheme: str = "middle",
                        fraction: float = 0.7, outer_width: int = 0,
                        multiple_of: int = 1) -> list[int]:
  """Per-layer FFN widths whose sum is `num_layers * base_width` (the uniform model's budget).

  Args:
    cfg_or_num_layers: a `ModelConfig` (its `num_layers`; `base_width` defaults to its `ffn_dim`,
      the default width, not its current per-layer widths) or the number of layers.
    base_width: the uniform width whose budget is kept; required with a number of layers.
    scheme: "uniform" (every layer base_width; `fraction`, `outer_width` and `multiple_of` are
      not used) or "middle" / "first" / "last": the layers of `ffn_block(num_layers, fraction,
      scheme)` share the budget left after every other layer gets `outer_width`.
    fraction: the share of layers in the block, in (0, 1]; 0.7 in Ikeda et al.
    outer_width: width of the layers outside the block, in [0, base_width] (0 = no FFN).
    multiple_of: the block's widths are multiples of this (e.g. 128 for TPU-friendly shapes).
      The remainder of the block's budget is spread one unit (one `multiple_of`) per layer from
      the lowest block layer up.  If the block's budget is not a multiple of `multiple_of`, no
      such widths can keep the total: the closest total is returned (the block's budget rounded
      to the nearest multiple, halves down) and a UserWarning states the deviation.

  Returns:
    A list of `num_layers` Python ints, for `ModelConfig.ffn_widths`.
  """
  if isinstance(cfg_or_num_layers, ModelConfig):
    num_layers = cfg_or_num_layers.num_layers
    if base_width is None:
      base_width = cfg_or_num_layers.ffn_dim
  else:
    num_layers = _positive_int(cfg_or_num_layers, "cfg_or_num_layers")
    if base_width is None:
      raise ValueError("base_width is required when cfg_or_num_layers is a number of layers "
                       f"({num_layers}); pass the uniform FFN width whose budget to keep")
  base_width = _positive_int(base_width, "base_width")
  if scheme == "uniform":
    return [base_width] * num_layers
  if scheme not in SCHEMES:
    raise ValueError(f"scheme = {scheme!r} unknown; expected one of {SCHEMES}")
  block = ffn_block(num_layers, fraction, scheme)
  outer_width = _positive_int(outer_width, "outer_width", minimum=0)
  if outer_width > base_width:
    raise ValueError(f"outer_width = {outer_width} exceeds base_width = {base_width}; the layers "
                     "outside the block would take budget from the block")
  multiple_of = _positive_int(multiple_of, "multiple_of")

  budget = num_layers * base_width - (num_layers - len(block)) * outer_width
  units, leftover = divmod(budget, multiple_of)
  if 2 * leftover > multiple_of:
    units += 1
  if units < len(block):
    raise ValueError(f"multiple_of = {multiple_of} leaves fewer multiples ({units}) than block "
                     f"layers ({len(block)}); some block layer would get no FFN")
  if leftover:
    warnings.warn(f"FFN budget of the {len(block)} block layers, {budget}, is not a multiple of "
                  f"multiple_of = {multiple_of}: the widths sum to "
                  f"{num_layers * base_width - budget + units * multiple_of} instead of "
                  f"{num_layers * base_width} ({units * multiple_of - budget:+d})",
                  stacklevel=3)  # the caller, past gin's wrapper
  per_layer, extra = divmod(units, len(block))
  widths = [outer_width] * num_layers
  for k, layer in enumerate(block):
    widths[layer] = (per_layer + (k < extra)) * multiple_of
  return widths
