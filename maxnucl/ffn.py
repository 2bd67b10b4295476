"""The FFN vocabulary every part of maxnucl shares: layer names, the FFN matrices and the
outgoing-connection entropy of a row.

    layer_name(3) == "layers_3";  layer_index("layers_3") == 3
    params[layer_name(i)]["mlp"][OUT]      # W [m_i, d]: row j = inner neuron j's outgoing weights
    params[layer_name(i)]["mlp"][GATE]     # U [d, m_i];  [UP]: V [d, m_i] (neuron j = column j)
    row_entropy(w)                         # [m] entropies of the rows of W (numpy)

The model (`maxnucl.models`), NUCL (`maxnucl.losses`), the pruner (`maxnucl.pruning`), the
converters and the tools spell layers and FFN keys through this module.

Row entropy (the NUCL paper's Eq. 2-3): r_jk = |W_jk| / sum_k |W_jk|, H_j = -sum_k r_jk log r_jk
with 0 log 0 = 0.  **Zero-row rule**: a row whose magnitudes are all <= ZERO_ROW_MAX_ABS has no
outgoing distribution; it is taken as the uniform distribution, H = log n — the largest entropy
an n-column row can have.  The loss gives it zero gradient (`losses.nucl_rows`, the same rule in
JAX), entropy pruning (which removes the highest entropies) removes it among the first, and
`inspect` counts it in its statistics like any other row.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

GATE, UP, OUT = "gate", "up", "out"  # the paper's U, V, W
FFN_KEYS = (GATE, UP, OUT)
LAYER_PREFIX = "layers_"
ZERO_ROW_MAX_ABS = 1e-36  # rows whose magnitudes are all <= this count as zero rows

_LAYER_NAME = re.compile(rf"^{LAYER_PREFIX}(\d+)$")


def layer_name(index: int) -> str:
  return f"{LAYER_PREFIX}{int(index)}"


def layer_index(name: str) -> int:
  """layer_index("layers_7") == 7; a ValueError naming `name` otherwise."""
  match = _LAYER_NAME.match(name)
  if not match:
    raise ValueError(f"{name!r} is not a layer name (expected '{LAYER_PREFIX}<index>')")
  return int(match.group(1))


def layer_names(num_layers: int, layers: Optional[Sequence[int]] = None) -> list[str]:
  """Names of the chosen layers (None = all), each index checked against `num_layers`."""
  if layers is None:
    return [layer_name(i) for i in range(num_layers)]
  bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, (int, np.integer))
         or not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"layer index {bad[0]!r} in {list(layers)} is not a layer (expected "
                     f"integers in [0, {num_layers}))")
  return [layer_name(i) for i in layers]


def ffn_layer_names(widths: Sequence[int]) -> list[str]:
  """Names of the layers that have an FFN (width > 0), in order."""
  return [layer_name(i) for i, w in enumerate(widths) if w > 0]


def row_entropy(w: np.ndarray, block_rows: int = 4096) -> np.ndarray:
  """Entropy of each row of |W| normalised per row: w [m, n] -> float64 [m], computed in blocks
  of rows (bounded memory for large W); zero rows get log n (module docstring)."""
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"row_entropy expects a matrix [rows, cols], got shape {w.shape}")
  out = np.empty(w.shape[0], np.float64)
  for start in range(0, w.shape[0], block_rows):
    a = np.abs(w[start:start + block_rows].astype(np.float64))
    zero = a.max(axis=1, initial=0.0) <= ZERO_ROW_MAX_ABS
    a[zero] = 1.0  # uniform
    r = a / a.sum(axis=1, keepdims=True)
    plogp = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    out[start:start + block_rows] = -plogp.sum(axis=1)
  return out
