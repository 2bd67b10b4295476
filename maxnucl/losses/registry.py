"""Named loss terms and the combiner `total = NLL + sum_k alpha_k * term_k` (paper Eq. 6).

A loss term is a function `term(params, logits, batch, cfg) -> float32 scalar`; a new term is one
function registered with `@register_term("name")`.  `total_loss` takes the terms to add as a
mapping name -> alpha, typically bound in gin:

    total_loss.terms = {'nucl_mstd': 100.0}
    nucl.target = 'ffn_out'

or, to distil from a teacher (its logits arrive in the batch under `distill.TEACHER_LOGITS`):

    total_loss.terms = {'distill_kl': 1.0}
    total_loss.nll_weight = 0.0
    distill.teacher = '/path/to/teacher'
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp

# Functions, not modules: the package namespace maps `nll` / `nucl` to these functions.
from maxnucl.losses.distill import TEACHER_LOGITS, distill, distill_kl
from maxnucl.losses.nll import NORMALIZATIONS, nll, z_loss
from maxnucl.losses.nucl import nucl
from maxnucl.models.config import ModelConfig

Array = jax.Array
LossTerm = Callable[[Any, Array, dict, ModelConfig], Array]

LOSS_TERMS: dict[str, LossTerm] = {}
RESERVED_METRICS = ("nll", "z_loss", "loss")  # metric names total_loss writes itself


def register_term(name: str) -> Callable[[LossTerm], LossTerm]:
  def register(fn: LossTerm) -> LossTerm:
    if name in LOSS_TERMS or name in RESERVED_METRICS:
      raise ValueError(f"loss term name {name!r} is taken (registered terms: "
                       f"{sorted(LOSS_TERMS)}; reserved metrics: {RESERVED_METRICS})")
    LOSS_TERMS[name] = fn
    return fn
  return register


# The NUCL variant is the term's name; target and layers come from the gin-configurable `nucl`.
@register_term("nucl_ent")
def nucl_ent(params, logits, batch, cfg):
  del logits, batch
  return nucl(params, cfg, variant="ent")


@register_term("nucl_gini")
def nucl_gini(params, logits, batch, cfg):
  del logits, batch
  return nucl(params, cfg, variant="gini")


@register_term("nucl_mstd")
def nucl_mstd(params, logits, batch, cfg):
  del logits, batch
  return nucl(params, cfg, variant="mstd")


# Inter-neuron diversity (beyond the paper): the mean pairwise cosine similarity of the rows'
# outgoing distributions, per target matrix, summed over the same layers as the NUCL terms.
@register_term("nucl_diversity")
def nucl_diversity(params, logits, batch, cfg):
  del logits, batch
  return nucl(params, cfg, variant="diversity")


# Forward KL(teacher || student) on the target tokens; temperature from the gin-configurable
# `distill`, the teacher's logits from the trainer (batch[TEACHER_LOGITS]).
@register_term("distill_kl")
def distill_kl_term(params, logits, batch, cfg):
  del params, cfg
  if TEACHER_LOGITS not in batch:
    raise ValueError("total_loss.terms has 'distill_kl' but there is no teacher: bind "
                     "distill.teacher = '<checkpoint or workdir>' (the trainer then passes its "
                     f"logits in batch[{TEACHER_LOGITS!r}])")
  return distill_kl(batch[TEACHER_LOGITS], logits, batch, distill().temperature)


def _weight(value: Any) -> bool:
  """A loss weight: a finite number >= 0 (a traced array is taken as given)."""
  if isinstance(value, jax.Array):
    return True
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)


def check_settings(terms: Optional[Mapping[str, float]], normalization: str,
                   z_loss_weight: float, nll_weight: float = 1.0) -> dict[str, float]:
  """`total_loss`'s settings checked, naming the binding: registered terms with weights that are
  finite numbers >= 0 (a negative alpha rewards what the term penalises), a known normalization.
  Returns the terms as a dict."""
  if terms is not None and not isinstance(terms, Mapping):
    raise ValueError(f"total_loss.terms = {terms!r}: expected a mapping of loss term name to "
                     f"weight, e.g. {{'nucl_mstd': 1.0}}")
  terms = dict(terms or {})
  for name, alpha in terms.items():
    if name not in LOSS_TERMS:
      raise ValueError(f"total_loss.terms: {name!r} is not a registered loss term; registered "
                       f"terms: {sorted(LOSS_TERMS)}")
    if not _weight(alpha):
      raise ValueError(f"total_loss.terms[{name!r}] = {alpha!r}: expected a finite number >= 0")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"total_loss.normalization = {normalization!r}: expected one of "
                     f"{list(NORMALIZATIONS)}")
  if not _weight(z_loss_weight):
    raise ValueError(f"total_loss.z_loss_weight = {z_loss_weight!r}: expected a finite number "
                     f">= 0")
  if not _weight(nll_weight):
    raise ValueError(f"total_loss.nll_weight = {nll_weight!r}: expected a finite number >= 0")
  return terms


@gin.configurable(module="maxnucl.losses", denylist=["params", "logits", "batch", "cfg"])
def total_loss(params: Any, logits: Array, batch: dict[str, Any], cfg: ModelConfig,
               terms: Optional[Mapping[str, float]] = None, normalization: str = "mean",
               z_loss_weight: float = 0.0, nll_weight: float = 1.0
               ) -> tuple[Array, dict[str, Array]]:
  """`nll_weight * NLL + z_loss_weight * z_loss + sum_k alpha_k * term_k` and its metrics.

  Args:
    params: the model's params tree.
    logits: [B, L, V] model outputs.
    batch: dict with "targets" int32 [B, L] and "loss_mask" float32 [B, L] (and, when
      distilling, the teacher's logits [B, L, V] under `TEACHER_LOGITS`).
    cfg: the model's `ModelConfig`.
    terms: registered term name -> alpha (None = plain NLL).  A term whose alpha is the Python
      number 0 is still reported in the metrics but carries no gradient, so the gradients equal
      the plain NLL's exactly.
    normalization: "mean" (per masked token) or "sum" over tokens, for the NLL and the z-loss;
      NUCL terms are always sums over layers (ent / gini / mstd also over rows; see
      docs/losses.md for alpha).
    z_loss_weight: weight of PaLM's log(Z)^2 (1e-4 in PaLM); 0 = off.
    nll_weight: weight of the NLL (1 = the paper's Eq. 6; 0 with `distill_kl` = pure
      distillation: the NLL is then still reported but carries no gradient).

  Returns:
    (total float32 scalar, metrics) with metrics "nll", each term's raw (un-weighted) value under
    its name, "z_loss" when z_loss_weight != 0, and "loss" = total.
  """
  terms = check_settings(terms, normalization, z_loss_weight, nll_weight)
  if TEACHER_LOGITS in batch and "distill_kl" not in terms:
    raise ValueError("distill.teacher is set but total_loss.terms has no 'distill_kl': add it, "
                     "e.g. total_loss.terms = {'distill_kl': 1.0}, or unbind distill.teacher")
  metrics = {"nll": nll(logits, batch, normalization)}
  if isinstance(nll_weight, (int, float)) and nll_weight == 0:  # reported, no gradient
    total = jnp.zeros((), jnp.float32)
  else:
    total = nll_weight * metrics["nll"]
  if z_loss_weight:
    metrics["z_loss"] = z_loss(logits, batch, normalization)
    total = total + z_loss_weight * metrics["z_loss"]
  for name, alpha in terms.items():
    value = LOSS_TERMS[name](params, logits, batch, cfg).astype(jnp.float32)
    if isinstance(alpha, (int, float)) and alpha == 0:
      metrics[name] = jax.lax.stop_gradient(value)
      continue
    metrics[name] = value
    total = total + alpha * value
  metrics["loss"] = total
  return total, metrics
