"""Logit distillation: forward KL(teacher || student) over the vocabulary (Hinton et al. 2015;
the recovery step of Minitron, Muralidharan et al. 2024, arXiv 2407.14679).

Per target token (a position whose `loss_mask` is on), with temperature T, teacher logits t and
student logits s over the vocabulary,

    p = softmax(t / T),  q = softmax(s / T),
    KL_T = T^2 * sum_v p_v (log p_v - log q_v),

reduced like the token NLL's "mean": sum(mask * KL_T) / sum(mask).  The T^2 factor (Hinton's)
keeps the gradient's scale that of T = 1 whatever T is (the softened distributions' gradient is
1/T^2 as large), so the term's weight does not have to follow the temperature.  Forward KL (the
teacher's distribution first) is the cross-entropy against the teacher's soft labels minus the
teacher's entropy: its gradient with respect to s is T * (q - p) per token (with the T^2), zero
when the student reproduces the teacher.

The teacher is frozen: the trainer (maxnucl.train) loads it once, runs it in the same jitted step
under `jax.lax.stop_gradient`, and hands its logits to the `distill_kl` loss term in the batch
under `TEACHER_LOGITS`.  The settings are the gin-configurable `distill` (docs/recovery.md).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

from maxnucl.losses.nll import reduce_tokens

Array = jax.Array

TEACHER_LOGITS = "teacher_logits"  # the batch key under which the trainer passes them
TEACHER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Distillation:
  """What `distill` binds: the teacher checkpoint (None = no distillation), the temperature and
  the dtype the teacher's params are held and run in."""
  teacher: Optional[str]
  temperature: float
  teacher_dtype: str


@gin.configurable(module="maxnucl.losses")
def distill(teacher: Optional[str | os.PathLike] = None, temperature: float = 1.0,
            teacher_dtype: str = "float32") -> Distillation:
  """The distillation settings, checked, naming the binding.

  Args:
    teacher: a maxnucl checkpoint or a training workdir (its latest step), e.g. the unpruned model
      a pruned student recovers from.  None = no teacher (the `distill_kl` term is then refused).
    temperature: T > 0 of the softened distributions; the KL is multiplied by T^2.
    teacher_dtype: "float32" or "bfloat16" (half the teacher's memory; its params are cast on
      load and its forward pass runs in that dtype; its logits are float32 either way).
  """
  if teacher is not None and not isinstance(teacher, (str, os.PathLike)):
    raise ValueError(f"distill.teacher = {teacher!r}: expected a checkpoint or workdir path, or "
                     f"None")
  if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
      or not math.isfinite(temperature) or temperature <= 0):
    raise ValueError(f"distill.temperature = {temperature!r}: expected a finite number > 0")
  if teacher_dtype not in TEACHER_DTYPES:
    raise ValueError(f"distill.teacher_dtype = {teacher_dtype!r}: expected one of "
                     f"{list(TEACHER_DTYPES)}")
  return Distillation(None if teacher is None else os.fspath(teacher), float(temperature),
                      teacher_dtype)


def token_kl(teacher_logits: Array, student_logits: Array, temperature: float = 1.0) -> Array:
  """T^2 * KL(softmax(t / T) || softmax(s / T)) per token, float32 [B, L], from [B, L, V] logits."""
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(f"teacher logits {teacher_logits.shape} and student logits "
                     f"{student_logits.shape} differ: distillation needs the same batch, length "
                     f"and vocabulary")
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  # p log p with p underflowed to 0 is 0 here, not 0 * -inf: log_p is finite for finite logits.
  return temperature ** 2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill_kl(teacher_logits: Array, student_logits: Array, batch: dict[str, Any],
               temperature: float = 1.0) -> Array:
  """`token_kl` averaged over the loss-masked target tokens (`batch["loss_mask"]` [B, L]), like
  the NLL's "mean" normalisation; 0 for a batch without loss tokens."""
  if "loss_mask" not in batch:
    raise KeyError(f"batch has no 'loss_mask'; expected float32 [B, L], got keys {sorted(batch)}")
  kl = token_kl(teacher_logits, student_logits, temperature)
  mask = batch["loss_mask"].astype(jnp.float32)
  if mask.shape != kl.shape:
    raise ValueError(f"loss_mask {mask.shape} does not match the logits' [B, L] {kl.shape}")
  return reduce_tokens(kl, mask, "mean")
