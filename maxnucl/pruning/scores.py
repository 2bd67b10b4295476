"""Neuron-removal criteria: a registry of named methods, one registered function each.

A method scores every inner neuron of one FFN layer.  `Method.remove` says which end is removed
("highest" entropy, "lowest" magnitude, ...).  A score of +inf / -inf on the removed / kept end
means "remove first" / "never remove" (e.g. zero rows for entropy, supernodes for scar_prot).

Two kinds of registered function:
  score functions        fn(layer: LayerInputs) -> scores [m]; the removal set is the top of the
                         ranking (scores do not change when another neuron is removed, so this
                         equals "repeatedly applying the removal criterion").
  compensating functions fn(layer: LayerInputs, num_remove: int | None) -> Removal; they remove
                         greedily and fold removed neurons into survivors (maxnucl.pruning.surgery).
                         With num_remove=None they return only the initial scores (used to share
                         a global budget across layers).

Adding a method = writing one function and decorating it with `@register(...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from maxnucl import ffn
from maxnucl.pruning import surgery
from maxnucl.pruning.calibration import LayerStats


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """Everything a method may look at for one layer (weights as stored, e.g. bfloat16)."""
  index: int
  name: str
  gate: np.ndarray  # U [d, m]
  up: np.ndarray  # V [d, m]
  out: np.ndarray  # W [m, d]; row j = outgoing connections of neuron j
  stats: Optional[LayerStats]  # calibration statistics (data-aware methods only)
  rng: np.random.Generator  # seeded per (seed, layer index)
  params: dict[str, Any]  # the method's parameters (defaults merged with user overrides)

  @property
  def width(self) -> int:
    return self.out.shape[0]

  def ffn(self, out: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """{U, V, W} by their FFN keys; `out` replaces W (a method's compensated W)."""
    return {ffn.GATE: self.gate, ffn.UP: self.up, ffn.OUT: self.out if out is None else out}


@dataclasses.dataclass
class Removal:
  """Result of a compensating method."""
  scores: np.ndarray  # [m] initial scores (same orientation as Method.remove)
  removed: Optional[np.ndarray] = None  # removed neuron indices, in removal order
  out: Optional[np.ndarray] = None  # compensated W [m, d] (float64), rows of survivors updated


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  fn: Callable
  remove: str  # "highest" or "lowest" score is removed
  needs_calibration: bool = False
  compensating: bool = False
  standardize_for_global: bool = False  # z-score per layer before a global ranking (FLAP)
  defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
  doc: str = ""

  def priority(self, scores: np.ndarray) -> np.ndarray:
    """Higher = removed earlier; -inf = protected."""
    scores = np.asarray(scores, np.float64)
    return scores if self.remove == "highest" else -scores


METHODS: dict[str, Method] = {}


def register(name: str, *, remove: str, needs_calibration: bool = False,
             compensating: bool = False, standardize_for_global: bool = False,
             **defaults: Any):
  assert remove in ("highest", "lowest"), remove

  def decorate(fn):
    METHODS[name] = Method(name, fn, remove, needs_calibration, compensating,
                           standardize_for_global, dict(defaults), (fn.__doc__ or "").strip())
    return fn

  return decorate


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown pruning method {name!r}; known methods: {sorted(METHODS)}")
  return METHODS[name]


def _rows(matrix: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], chunk: int = 1024):
  """fn applied to float64 row blocks of `matrix` (bounds the float64 copy to `chunk` rows)."""
  return np.concatenate([fn(np.asarray(matrix[s:s + chunk], np.float64))
                         for s in range(0, matrix.shape[0], chunk)]) if matrix.shape[0] else \
      np.zeros(0)


# ---- data-free (NUCL paper, Table 4) -------------------------------------------------------------

@register("entropy", remove="highest")
def entropy_scores(layer: LayerInputs) -> np.ndarray:
  """NUCL Eq. 8: remove the neurons with the highest outgoing-connection entropy
  (`ffn.row_entropy`; a zero row has the largest possible entropy, log d, so it goes among the
  first)."""
  return ffn.row_entropy(layer.out)


@register("magnitude", remove="lowest")
def magnitude_scores(layer: LayerInputs) -> np.ndarray:
  """NUCL Eq. 7: remove the neurons with the smallest sum_k W_jk^2."""
  return _rows(layer.out, lambda w: np.sum(w * w, axis=1))


@register("random", remove="highest")
def random_scores(layer: LayerInputs) -> np.ndarray:
  """Uniformly random removal set, seeded by (--seed, layer index)."""
  return layer.rng.random(layer.width)


@register("srinivas_babu", remove="lowest", compensating=True)
def srinivas_babu(layer: LayerInputs, num_remove: Optional[int]) -> Removal:
  """Srinivas & Babu 2015, GLU adaptation: cost of "delete j, merge into i" is
  mean_k W_jk^2 * (||U_j - U_i||^2 + ||V_j - c V_i||^2), c = <V_j,V_i>/||V_i||^2; greedily delete
  the cheapest j and set W_i += c W_j; affected costs recomputed after every deletion."""
  if num_remove is None:
    dist, _, wsq = surgery.merge_costs(layer.gate, layer.up, layer.out)
    return Removal(scores=wsq * dist.min(axis=1) if layer.width > 1 else wsq)
  removed, out, initial = surgery.merge_greedy(layer.ffn(), num_remove)
  return Removal(scores=initial, removed=removed, out=out)


@register("stahlberg_byrne", remove="lowest", compensating=True, neighbours=16, batch_size=0,
          ridge=1e-10)
def stahlberg_byrne(layer: LayerInputs, num_remove: Optional[int]) -> Removal:
  """Stahlberg & Byrne 2017, data-free GLU adaptation: neuron j is expressed as a least-squares
  combination of its `neighbours` nearest survivors by gate vector (lambda fitted on up vectors);
  cost = mean_k W_jk^2 * (residual + sum_k lambda_k^2 ||U_k - U_j||^2); W_k += lambda_k W_j;
  costs recomputed every `batch_size` removals (0 = max(1, m // 256))."""
  p = layer.params
  removed, out, initial = surgery.least_squares_greedy(
      layer.ffn(), 0 if num_remove is None else num_remove, neighbours=int(p["neighbours"]),
      batch_size=int(p["batch_size"]), ridge=float(p["ridge"]))
  if num_remove is None:
    return Removal(scores=initial)
  return Removal(scores=initial, removed=removed, out=out)


# ---- data-aware ------------------------------------------------------------------------------------

def _require_stats(layer: LayerInputs, method: str) -> LayerStats:
  if layer.stats is None:
    raise ValueError(f"method {method!r} needs calibration statistics for {layer.name}")
  return layer.stats


@register("wanda_channel", remove="lowest", needs_calibration=True)
def wanda_channel(layer: LayerInputs) -> np.ndarray:
  """s_j = sum_r |U_rj| ||x_r|| + sum_r |V_rj| ||x_r|| + sum_o |W_jo| ||a_j|| (norms over
  calibration tokens; x = FFN input, a = inner activation)."""
  st = _require_stats(layer, "wanda_channel")
  x_norm = np.sqrt(st.x_sq_sum)[:, None]
  a_norm = np.sqrt(st.a_sq_sum)
  s_in = (np.abs(np.asarray(layer.gate, np.float64)) * x_norm).sum(0) + \
      (np.abs(np.asarray(layer.up, np.float64)) * x_norm).sum(0)
  return s_in + _rows(layer.out, lambda w: np.abs(w).sum(1)) * a_norm


@register("flap", remove="lowest", needs_calibration=True, standardize_for_global=True)
def flap(layer: LayerInputs) -> np.ndarray:
  """FLAP fluctuation metric (WIFV): s_j = Var_n(a_nj) * ||W_j||^2.  Global budget: scores are
  standardised per layer (FLAP's adaptive structure).  FLAP's bias compensation is omitted: the
  Gemma-2 / PaLM FFN has no output bias (and Gemma-2 normalises the FFN output)."""
  st = _require_stats(layer, "flap")
  return st.a_var * _rows(layer.out, lambda w: np.sum(w * w, axis=1))


@register("lp", remove="lowest", needs_calibration=True)
def loss_proxy(layer: LayerInputs) -> np.ndarray:
  """SCAR loss proxy LP_j = 1/2 E_tokens[(a_nj g_nj)^2]; keep the highest LP.  Per token:
  g_n = dL/da_n with L the summed token NLL (calibration.LayerStats.loss_proxy), so the scores
  and the removal set do not depend on how the calibration data was batched."""
  return _require_stats(layer, "lp").loss_proxy


@register("activation", remove="lowest", needs_calibration=True, absolute=False)
def activation(layer: LayerInputs) -> np.ndarray:
  """Minitron's activation-based width importance for MLP neurons (Muralidharan et al. 2024,
  "Compact Language Models via Pruning and Knowledge Distillation", Sec. 2.2:
  F_neuron^(i) = sum_{B,S} X (W_1^i)^T, with the aggregation their ablation found best, L2 over
  the batch of the mean over the sequence): s_j = sqrt( sum_s (mean_{n in s} a_nj)^2 ), s over
  the calibration sequences (file rows; a packed row's examples).
  a = act(x U) * (x V) is the gated FFN's inner activation, the input of the down projection W:
  the per-neuron quantity of a GLU (X W_1^T of the paper's plain MLP has no single per-neuron
  analogue here) and what NVIDIA's ModelOpt implementation hooks.  The mean is of signed values,
  as the equation writes; `absolute=true` takes the mean of |a_nj| instead, as ModelOpt does."""
  stats = _require_stats(layer, "activation")
  return stats.activation_importance(bool(layer.params["absolute"]))


def supernodes(lp: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the top ceil(fraction * m) channels by LP (at least one)."""
  count = max(1, int(np.ceil(fraction * lp.size)))
  return np.lexsort((np.arange(lp.size), -lp))[:count]


def halo_protection(out: np.ndarray, core: np.ndarray, *, dims_fraction: float,
                    concentration: float, strength: float) -> np.ndarray:
  """Protection factor [m] (>= 1) for halo channels; see docs/pruning.md (scar_prot).

  Core output dims D = top ceil(dims_fraction * d) output dimensions by sum_{s in core} |W_so|.
  A non-core channel is in the halo when its share of outgoing mass on D is at least
  `concentration` times the uniform share |D|/d.  Its factor is 1 + strength * rho_j, rho_j =
  max_{s in core} |cos(W_j, W_s)| (redundancy with the core).
  """
  w = np.asarray(out, np.float64)
  m, d = w.shape
  a = np.abs(w)
  n_dims = max(1, int(np.ceil(dims_fraction * d)))
  dims = np.argsort(-a[core].sum(0), kind="stable")[:n_dims]
  total = a.sum(1)
  share = np.divide(a[:, dims].sum(1), total, out=np.zeros(m), where=total > 0)
  halo = share >= concentration * n_dims / d
  halo[core] = False
  norms = np.linalg.norm(w, axis=1)
  unit = np.divide(w, norms[:, None], out=np.zeros_like(w), where=norms[:, None] > 0)
  rho = np.abs(unit @ unit[core].T).max(axis=1)
  return np.where(halo, 1.0 + strength * rho, 1.0)


@register("scar_prot", remove="lowest", needs_calibration=True, supernode_fraction=0.01,
          halo_dims_fraction=0.01, halo_concentration=2.0, protection=1.0)
def scar_prot(layer: LayerInputs) -> np.ndarray:
  """SCAR-Prot: keep score LP_j * protection_j (halo channels redundant with the core get
  protection > 1); supernodes (top `supernode_fraction` by LP) are never removed (+inf).  LP is
  the per-token loss proxy of `lp`, independent of the calibration batch size."""
  p = layer.params
  lp = _require_stats(layer, "scar_prot").loss_proxy
  core = supernodes(lp, float(p["supernode_fraction"]))
  score = lp * halo_protection(layer.out, core, dims_fraction=float(p["halo_dims_fraction"]),
                               concentration=float(p["halo_concentration"]),
                               strength=float(p["protection"]))
  score[core] = np.inf
  return score
