"""Token negative log-likelihood (paper Eq. 1) with an optional PaLM z-loss, in float32.

Normalisation over the masked tokens of a batch:
  * "mean" (default): sum of the masked per-token losses / number of masked tokens.  The NLL is
    then in per-token units, so alpha in `total = NLL + alpha * NUCL` weighs a *sum* over all
    rows and layers against one average token: the right alpha shrinks as the model grows
    (more rows) and does not change with batch size.
  * "sum": sum of the masked per-token losses, as in Eq. 1 (summed over the batch too).  The NLL
    then grows with the number of tokens per batch, and so does the alpha that keeps the same
    balance: alpha_sum ~= alpha_mean * tokens_per_batch.  The paper's range 1e-2 .. 1e4 "depending
    on the model size and batch size" spans both effects.
`loss_mask` acts as a per-token weight (0/1 in the usual case).  A batch without masked tokens
has NLL 0 under either normalisation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

NORMALIZATIONS = ("mean", "sum")


def _check_batch(logits: Array, batch: dict[str, Any]) -> tuple[Array, Array]:
  for key in ("targets", "loss_mask"):
    if key not in batch:
      raise KeyError(f"batch has no {key!r}; expected 'targets' int32 [B, L] and 'loss_mask' "
                     f"float32 [B, L], got keys {sorted(batch)}")
  targets, mask = batch["targets"], batch["loss_mask"]
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
    raise ValueError(f"expected logits [B, L, V] with targets and loss_mask [B, L]; got logits "
                     f"{logits.shape}, targets {targets.shape}, loss_mask {mask.shape}")
  return targets, mask.astype(jnp.float32)


def reduce_tokens(per_token: Array, mask: Array, normalization: str = "mean") -> Array:
  """Masked sum [B, L] -> scalar, divided by the number of masked tokens for "mean"."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"loss normalization {normalization!r} unknown; expected one of "
                     f"{NORMALIZATIONS}")
  total = jnp.sum(per_token * mask)
  if normalization == "sum":
    return total
  count = jnp.sum(mask)
  return total / jnp.where(count > 0, count, 1.0)


def token_log_z(logits: Array) -> Array:
  """log of the softmax normaliser, float32 [B, L]."""
  return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def nll(logits: Array, batch: dict[str, Any], normalization: str = "mean") -> Array:
  """Cross-entropy of `batch["targets"]` under logits [B, L, V], masked by `batch["loss_mask"]`."""
  targets, mask = _check_batch(logits, batch)
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return reduce_tokens(token_log_z(logits) - target_logit, mask, normalization)


def z_loss(logits: Array, batch: dict[str, Any], normalization: str = "mean") -> Array:
  """PaLM's auxiliary log(Z)^2 per token, normalised like the NLL (weight it with ~1e-4)."""
  _, mask = _check_batch(logits, batch)
  return reduce_tokens(jnp.square(token_log_z(logits)), mask, normalization)
