"""Non-Uniform Connectivity Loss (NUCL, Stahlberg & Kumar 2025, Eq. 2-6, 9 and Listing 1).

For a matrix W [m, n] whose row i holds the outgoing (or, for the incoming targets, incoming)
weights of inner neuron i, the outgoing weight distribution of row i is (Eq. 2)

    r_j = |W_ij| / sum_j' |W_ij'|,

and each variant maps r to a number that is small for a peaked (heterogeneous) row:

    ent  (Eq. 3):  -sum_j r_j log r_j                     (Listing 1 form: log z + sum entr(|w|)/z)
    gini (Eq. 4):  1 - sum_j r_j^2
    mstd (Eq. 5):  -sqrt(sum_j (r_j - 1/n)^2 / n)

NUCL for a model (Eq. 6) is the sum of the per-row values over the rows of the chosen matrix of
every chosen layer.

Inter-neuron diversity (not in the paper; its Limitations name the per-neuron focus of NUCL and
suggest diversity *between* neurons).  With u_i = r_i / ||r_i||_2 the unit vector of row i's
distribution, the mean cosine similarity over the m (m - 1) ordered pairs of distinct rows is

    diversity:  sum_{i != k} u_i . u_k / (m (m - 1)) = (||sum_i u_i||^2 - m) / (m (m - 1)),

in [0, 1], small for rows that spread their weight over different columns; 0 for m < 2.  The
right-hand side needs the [n] vector sum_i u_i, not the [m, m] similarity matrix.

Numerics (the guards Listing 1 lacks; all computed in float32 whatever the parameter dtype):
  * |W_ij| has the gradient sign(W_ij), so an exact zero weight gets gradient 0 (the symmetric
    subgradient of |.| at 0; `jnp.abs` would give 1).
  * A row is first divided by its largest magnitude (r is scale invariant), so rows of 1e30 or
    1e-30 neither overflow nor underflow.  The divisor carries no gradient: r does not depend on
    it, so the gradient is the exact gradient of Eq. 2.
  * A *zero row* -- every |W_ij| <= `ZERO_ROW_MAX_ABS` -- has no distribution (Listing 1 divides
    0 by 0).  It is treated as the uniform distribution r = 1/n, so ent = log n,
    gini = 1 - 1/n, mstd = 0, with zero gradient.  The threshold is far below any trained
    weight; it keeps the gradient (which scales like 1 / max|W_i|) finite in float32.
  * ent: 0 log 0 = 0 through a safe `where`, so rows with exact zeros (one-hot rows) have finite
    gradients.
  * mstd: computed as Eq. 5 is written, mean_j (r_j - 1/n)^2, not in the paper's Eq. 9 form
    (sum_j r_j^2 - 1/n) / n.  Both are equal in exact arithmetic, but Eq. 9 subtracts two nearly
    equal numbers: in float32 it rounds to 0 or below 0 for near-uniform rows (Listing 1 then
    takes sqrt of a negative number) and is ~1000x less accurate there, while Eq. 5 is >= 0 by
    construction.  sqrt is taken through a safe `where`, so an exactly uniform row has value 0
    and gradient 0 (the symmetric subgradient of -|.| at its kink; elsewhere the gradient of
    mstd with respect to r has norm 1/sqrt(n), so it is bounded).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp

from maxnucl import ffn
from maxnucl.models.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]

ZERO_ROW_MAX_ABS = ffn.ZERO_ROW_MAX_ABS  # rows whose magnitudes are all <= this are zero rows


# ---- per-row values ------------------------------------------------------------------------------


def _scaled_abs(w: Array) -> Array:
  """|W| [m, n] in float32 divided per row by its max; a zero row becomes all ones (uniform)."""
  w = w.astype(jnp.float32)
  # |w| with d|w|/dw = sign(w), i.e. 0 at w = 0 (jnp.abs uses 1 there, which would push an exact
  # zero off zero in the direction that raises every variant).
  a = w * jax.lax.stop_gradient(jnp.sign(w))
  row_max = jax.lax.stop_gradient(jnp.max(a, axis=1, keepdims=True))
  zero_row = row_max <= ZERO_ROW_MAX_ABS
  s = a / jnp.where(zero_row, 1.0, row_max)
  # A zero row becomes a row of ones, i.e. the uniform distribution, with no gradient to W.
  return jnp.where(zero_row, 1.0, s)


def _ent(s: Array) -> Array:
  # Listing 1: -sum r log r = log z - sum s log s / z with z = sum s (s = |w| up to a row scale).
  z = jnp.sum(s, axis=1)
  positive = s > 0
  s_log_s = jnp.where(positive, s * jnp.log(jnp.where(positive, s, 1.0)), 0.0)
  return jnp.log(z) - jnp.sum(s_log_s, axis=1) / z


def _gini(s: Array) -> Array:
  r = s / jnp.sum(s, axis=1, keepdims=True)
  return 1.0 - jnp.sum(jnp.square(r), axis=1)


def _mstd(s: Array) -> Array:
  n = s.shape[1]
  r = s / jnp.sum(s, axis=1, keepdims=True)
  # Eq. 5 as written, not Eq. 9: equal in exact arithmetic, but Eq. 9's sum r^2 - 1/n cancels
  # catastrophically in float32 (near-uniform rows round to 0 and lose their gradient).
  variance = jnp.mean(jnp.square(r - 1.0 / n), axis=1)
  positive = variance > 0
  return -jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)


# Variant name -> per-row function of the row-scaled magnitudes s [m, n] (no zero rows) -> [m].
VARIANTS: dict[str, Callable[[Array], Array]] = {"ent": _ent, "gini": _gini, "mstd": _mstd}


def nucl_rows(w: Array, variant: str) -> Array:
  """Per-row NUCL values [m] (float32) of a matrix w [m, n]; rows = inner neurons (Eq. 3-5)."""
  if variant not in VARIANTS:
    raise ValueError(f"NUCL variant {variant!r} unknown; expected one of {sorted(VARIANTS)}")
  if w.ndim != 2:
    raise ValueError(f"nucl_rows expects a matrix [m, n] (rows = inner neurons), got shape "
                     f"{w.shape}")
  return _nucl_rows(w, variant)


@functools.partial(jax.jit, static_argnames="variant")
def _nucl_rows(w: Array, variant: str) -> Array:
  # Compiled once per shape, dtype and variant: eager callers (analysis, pruning) pay one
  # dispatch, and inside a jitted train step it inlines.
  return VARIANTS[variant](_scaled_abs(w))


# ---- inter-neuron diversity (one value per matrix) ----------------------------------------------


def mean_pairwise_similarity(w: Array) -> Array:
  """Mean cosine similarity of the outgoing distributions of distinct rows of w [m, n]: float32
  scalar in [0, 1] (0 for m < 2); the `diversity` value of a matrix (module docstring)."""
  if w.ndim != 2:
    raise ValueError(f"mean_pairwise_similarity expects a matrix [m, n] (rows = inner neurons), "
                     f"got shape {w.shape}")
  return _mean_pairwise_similarity(w)


@jax.jit
def _mean_pairwise_similarity(w: Array) -> Array:
  m = w.shape[0]
  if m < 2:
    return jnp.zeros((), jnp.float32)
  s = _scaled_abs(w)  # [m, n], r up to a per-row scale; a zero row is uniform, without gradient
  # u = r / ||r|| = s / ||s||: no need for r itself.  ||s|| >= 1 since max_j s_ij = 1.
  u = s / jnp.sqrt(jnp.sum(jnp.square(s), axis=1, keepdims=True))
  # ||sum_i u_i||^2 - m = sum_j [(sum_i u_ij)^2 - sum_i u_ij^2]: the diagonal is subtracted as
  # computed (m up to the rounding of u), per column, which cancels most of that rounding.
  column_sums = jnp.sum(u, axis=0)  # [n]
  off_diagonal = jnp.sum(jnp.square(column_sums) - jnp.sum(jnp.square(u), axis=0))
  return off_diagonal / (m * (m - 1))


# ---- which matrices: targets (the paper's Table 3) -----------------------------------------------


def _mlp(layer: Params, name: str) -> Optional[Array]:
  return layer["mlp"][name] if "mlp" in layer else None


def _attn_out(layer: Params) -> Array:
  if "o" not in layer.get("attn", {}):
    raise KeyError(f"NUCL target 'attn_out' needs a layer's ['attn']['o'] [N, H, d]; the layer "
                   f"has keys {sorted(layer)}")
  o = layer["attn"]["o"]  # [N, H, d]
  return o.reshape(o.shape[0] * o.shape[1], o.shape[2])  # rows = the N*H attention inner dims


# Target name -> function of one layer's params -> matrix [rows, cols] with rows = inner neurons,
# or None where the layer has no such matrix (a layer with FFN width 0 has no "mlp").
TARGETS: dict[str, Callable[[Params], Optional[Array]]] = {
    "ffn_out": lambda layer: _mlp(layer, ffn.OUT),  # W [m, d]
    # The stored incoming kernels are [d, m]: the neuron's row of U / V is a column, hence .T.
    "ffn_in_linear": lambda layer: None if _mlp(layer, ffn.UP) is None else _mlp(layer, ffn.UP).T,
    "ffn_in_gated": lambda layer: (None if _mlp(layer, ffn.GATE) is None
                                   else _mlp(layer, ffn.GATE).T),
    "attn_out": _attn_out,  # o [N, H, d] -> [N*H, d]
}


def layer_names(cfg: ModelConfig, layers: Optional[Sequence[int]] = None) -> list[str]:
  """Names of the chosen layers (`ffn.layer_name`); None = all `cfg.num_layers` layers."""
  try:
    return ffn.layer_names(cfg.num_layers, layers)
  except ValueError as e:
    raise ValueError(f"NUCL layers of model {cfg.name!r}: {e}") from None


def target_matrices(params: Params, cfg: ModelConfig, target: str = "ffn_out",
                    layers: Optional[Sequence[int]] = None) -> dict[str, Array]:
  """Layer name -> the target matrix [rows = inner neurons, cols] of each chosen layer.

  Layers without the target (no "mlp" for the FFN targets) are left out.
  """
  if target not in TARGETS:
    raise ValueError(f"NUCL target {target!r} unknown; expected one of {sorted(TARGETS)}")
  out = {}
  for name in layer_names(cfg, layers):
    if name not in params:
      raise KeyError(f"params has no {name!r} but model {cfg.name!r} has "
                     f"num_layers={cfg.num_layers}; params keys: {sorted(params)}")
    matrix = TARGETS[target](params[name])
    if matrix is not None:
      out[name] = matrix
  return out


def _summed_rows(variant: str) -> Callable[[Array], Array]:
  return lambda w: jnp.sum(nucl_rows(w, variant))


# Variant name -> function of one target matrix [m, n] -> its float32 contribution to `nucl`: the
# row variants summed over rows (Eq. 6), and the inter-neuron diversity.
MATRIX_VALUES: dict[str, Callable[[Array], Array]] = {
    **{variant: _summed_rows(variant) for variant in VARIANTS},
    "diversity": mean_pairwise_similarity,
}


# The variant is chosen by the loss term's name ('nucl_mstd', ...), so gin may not bind it.
@gin.configurable(module="maxnucl.losses", denylist=["params", "cfg", "variant"])
def nucl(params: Params, cfg: ModelConfig, variant: str = "mstd", target: str = "ffn_out",
         layers: Optional[Sequence[int]] = None) -> Array:
  """NUCL of a model (the sum in Eq. 6, without alpha): float32 scalar.

  Sum over the `target` matrix of each layer in `layers` (None = all layers) of
  `MATRIX_VALUES[variant]`: for ent / gini / mstd the sum over its rows, for diversity its mean
  pairwise similarity.
  """
  if variant not in MATRIX_VALUES:
    raise ValueError(f"NUCL variant {variant!r} unknown; expected one of {sorted(MATRIX_VALUES)}")
  total = jnp.zeros((), jnp.float32)
  for matrix in target_matrices(params, cfg, target, layers).values():
    total = total + MATRIX_VALUES[variant](matrix)
  return total


# ---- the paper's Fig. 2 quantity (also the entropy-based pruning score) --------------------------


def outgoing_entropy_rows(params: Params, cfg: ModelConfig) -> dict[str, Array]:
  """Layer name -> entropy (Eq. 3) of each row of W, float32 [m_i] ([0] for a layer w/o FFN)."""
  widths = cfg.layer_ffn_widths
  matrices = target_matrices(params, cfg, "ffn_out")
  out = {}
  for i in range(cfg.num_layers):
    name = ffn.layer_name(i)
    if name not in matrices:
      if widths[i]:
        raise KeyError(f"params[{name!r}] has no 'mlp' but model {cfg.name!r} has "
                       f"layer_ffn_widths[{i}] = {widths[i]}")
      out[name] = jnp.zeros((0,), jnp.float32)
    else:
      out[name] = nucl_rows(matrices[name], "ent")
  return out


def outgoing_entropy(params: Params, cfg: ModelConfig) -> Array:
  """Per-layer sum of the row entropies of W: float32 [num_layers] (0 for a layer without FFN)."""
  rows = outgoing_entropy_rows(params, cfg)
  return jnp.stack([jnp.sum(rows[ffn.layer_name(i)]) for i in range(cfg.num_layers)])
