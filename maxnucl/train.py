"""The trainer: fine-tune (or train from scratch) a maxnucl decoder with NLL + registered loss terms.

    python -m maxnucl.train --gin_file=gin/demo_cpu.gin [--gin_file=...] \
        [--gin_param="train_loop.num_steps = 100" ...] [--workdir=/tmp/run]

Everything experiment-specific comes from gin (see gin/base.gin and docs/training.md): the model
(`model_config`), the data (`create_data_iterator`), the loss terms (`total_loss.terms`, e.g.
NUCL-mstd, or `distill_kl` with a frozen teacher `distill.teacher`: docs/recovery.md), the
optimizer and schedule (`create_optimizer`, `learning_rate_schedule`), the mesh and logical axis
rules (`create_mesh`, `logical_axis_rules`) and the loop (`train_loop`).

Read top to bottom: `loss_fn` -> `train_step` -> `eval_step` -> `train_loop` -> `main`.  The rest
is setup: optimizer and schedule, shardings of the train state, checkpointing and metrics.

Workdir layout:
    DIR/checkpoints/<step>/{params,opt_state,model_config,train_state}   (Orbax, keep-N, async)
    DIR/metrics.jsonl      one JSON object per logged step
    DIR/tensorboard/       TensorBoard event files
    DIR/config.gin         the gin config of the run (operative_config.gin: the values used)
DIR may be a URL, `gs://bucket/run` (or `file:///dir`, which takes the same code path): Orbax
then marks each finished step with `commit_success.txt` instead of renaming it into place,
metrics.jsonl is rewritten whole at each log step (an object in a bucket cannot be appended to)
and TensorBoard event files go through etils.epath (`paths.tensorboard_logdir`).
"""

from __future__ import annotations

if __name__ == "__main__":
  # `python -m maxnucl.train`: run the imported module's main, so gin sees each configurable once
  # (as maxnucl.train.*) rather than also as __main__.*.
  from maxnucl import train
  train.cli()

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import checkpoints
from maxnucl import compilation
from maxnucl import distributed
from maxnucl import flops
from maxnucl import losses
from maxnucl import models
from maxnucl import outputs
from maxnucl import paths
from maxnucl import run_guard
from maxnucl import sharding
from maxnucl import evaluate
from maxnucl import gin_config
from maxnucl.gin_config import parse as parse_gin  # noqa: F401  (re-exported for callers)
from maxnucl.data import pipeline, vocabularies
from maxnucl.evaluation import core, perplexity
from maxnucl.models.config import ModelConfig

log = logging.getLogger("maxnucl.train")

# Item names of a checkpoint step directory; `params` and `model_config` are those of
# `maxnucl.checkpoints`, so `checkpoints.load(DIR/checkpoints/<step>)` reads a training checkpoint.
PARAMS, MODEL_CONFIG = checkpoints.PARAMS, checkpoints.MODEL_CONFIG
OPT_STATE, TRAIN_STATE = "opt_state", "train_state"
BATCH_AXES = ("activation_batch", "activation_length")

TrainState = dict  # {"params": tree, "opt_state": tree, "step": int32 scalar}


class TrainingError(RuntimeError):
  """The run cannot continue (non-finite loss, mismatched data and model, ...)."""


class NonFiniteLossError(TrainingError):
  """A step produced a non-finite loss, gradient or parameter; its state was not saved."""


# ---- the loss and the steps ---------------------------------------------------------------------

def loss_fn(params: dict, batch: dict, dropout_rng: Optional[jax.Array], cfg: ModelConfig,
            teacher: Optional[dict] = None, teacher_cfg: Optional[ModelConfig] = None
            ) -> tuple[jax.Array, dict]:
  """`total_loss` (NLL + the gin-bound terms, e.g. NUCL-mstd) of one (micro)batch.  With a
  `teacher` (params of `teacher_cfg`, frozen), its logits on the same tokens go to the loss
  terms (`distill_kl`) in the batch under `losses.TEACHER_LOGITS`."""
  logits = models.apply(cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"],
                        dropout_rng=dropout_rng)
  if teacher is not None:
    batch = dict(batch, **{losses.TEACHER_LOGITS: teacher_logits(teacher, batch, teacher_cfg)})
  return losses.total_loss(params, logits, batch, cfg)


def teacher_logits(teacher: dict, batch: dict, teacher_cfg: ModelConfig) -> jax.Array:
  """The frozen teacher's float32 logits [B, L, V] (no dropout, no gradient)."""
  logits = models.apply(teacher_cfg, jax.lax.stop_gradient(teacher), batch["tokens"],
                        batch["segment_ids"], batch["positions"])
  return jax.lax.stop_gradient(logits)


def _microbatches(batch: dict, accumulation_steps: int) -> dict:
  """[B, L] -> [A, B/A, L] with microbatch k = rows k, k+A, k+2A, ...

  Row r of a batch sharded over devices lives on device r // (B/D); taking every A-th row keeps
  each microbatch spread evenly over the same devices (no data movement when B/D % A == 0).
  """
  def split(x):
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape((rows // accumulation_steps, accumulation_steps) + x.shape[1:]),
                        0, 1)
  return jax.tree.map(split, batch)


def _token_shares(micro: dict) -> tuple[dict, jax.Array]:
  """Microbatch weights w_k = t_k / T, microbatch k's share of the global batch's T loss tokens,
  and the microbatches [A, B/A, L] with `loss_mask` divided by w_k.

  sum_k w_k * total_loss(microbatch k) is then total_loss of the global batch under either
  normalisation: a 'mean' is unchanged by the rescaled mask, and sum_k (t_k / T) mean_k is the
  global mean (not the mean of microbatch means); a 'sum' becomes sum_k / w_k, so the weighted
  sums add up to the global sum; and the terms that do not depend on the batch (NUCL) get total
  weight sum_k w_k = 1, as without accumulation.  A microbatch without loss tokens has weight 0;
  a global batch without any has weights 1/A (its step is the NUCL terms' alone).
  """
  tokens = jnp.sum(micro["loss_mask"], axis=(1, 2))
  total = jnp.sum(tokens)
  uniform = jnp.full_like(tokens, 1.0 / tokens.shape[0])
  weights = jnp.where(total > 0, tokens / jnp.where(total > 0, total, 1.0), uniform)
  mask_scale = jnp.where(tokens > 0, 1.0 / jnp.where(tokens > 0, weights, 1.0), 1.0)
  return dict(micro, loss_mask=micro["loss_mask"] * mask_scale[:, None, None]), weights


def train_step(state: TrainState, batch: dict, rng: jax.Array, teacher: Optional[dict] = None, *,
               cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
               accumulation_steps: int = 1, teacher_cfg: Optional[ModelConfig] = None
               ) -> tuple[TrainState, dict]:
  """One optimizer step over a global batch, accumulating gradients over microbatches.

  Microbatch losses are weighted by their share of the batch's loss tokens, with their loss masks
  rescaled by its inverse (`_token_shares`), so for `total_loss.normalization = 'mean'` and
  'sum' alike the accumulated gradient and metrics are those of the whole batch, and alpha keeps
  its meaning whatever `accumulation_steps` is (the NUCL terms get total weight 1).  Dropout uses
  fold_in(fold_in(rng, step), microbatch): a resumed run draws the same masks.  A distillation
  `teacher` (params of `teacher_cfg`, not part of the state, never differentiated) runs on each
  microbatch inside the step.
  """
  params, step = state["params"], state["step"]
  step_rng = jax.random.fold_in(rng, step)
  use_dropout = cfg.dropout_rate > 0.0
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg=cfg, teacher_cfg=teacher_cfg),
                               has_aux=True)

  def micro_grads(micro, k):
    (_, metrics), grads = grad_fn(params, micro, jax.random.fold_in(step_rng, k)
                                  if use_dropout else None, teacher=teacher)
    return grads, metrics

  if accumulation_steps == 1:
    grads, metrics = micro_grads(batch, 0)
  else:
    micro, weights = _token_shares(_microbatches(batch, accumulation_steps))

    def body(carry, xs):
      mb, k, w = xs
      grads, metrics = micro_grads(mb, k)
      return jax.tree.map(lambda acc, x: acc + w * x, carry, (grads, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(micro_grads, first, 0))
    (grads, metrics), _ = jax.lax.scan(
        body, zeros, (micro, jnp.arange(accumulation_steps), weights))

  updates, opt_state = tx.update(grads, state["opt_state"], params)
  params = optax.apply_updates(params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 learning_rate=schedule(step), loss_tokens=jnp.sum(batch["loss_mask"]))
  return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics


def eval_step(params: dict, batch: dict, *, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Summed token NLL and loss-token count of one held-out batch (no dropout): the held-out NLL
  of `maxnucl.evaluation.perplexity`, shared with the evaluator and the pruner."""
  sums, counts = perplexity.row_nll(params, batch, cfg=cfg)
  return jnp.sum(sums), jnp.sum(counts)


# ---- the loop -----------------------------------------------------------------------------------

@gin.configurable(denylist=["workdir", "mesh", "allow_config_change"])
def train_loop(workdir: str | os.PathLike, *,
               num_steps: int = 100,
               seed: int = 0,
               accumulation_steps: int = 1,
               init_checkpoint: Optional[str] = None,
               log_every: int = 10,
               eval_every: int = 0,
               eval_split: str = "test",
               eval_batches: int = 4,
               eval_tasks: Sequence[Any] = (),
               eval_tasks_every: int = 0,
               eval_tasks_limit: Optional[int] = 64,
               checkpoint_every: int = 100,
               keep_checkpoints: int = 3,
               async_checkpointing: bool = True,
               progress_bar: bool = True,
               mesh: Optional[Mesh] = None,
               allow_config_change: bool = False) -> dict:
  """Train for `num_steps` optimizer steps in `workdir`, resuming its latest checkpoint if any.

  Args:
    workdir: output directory (checkpoints/, metrics.jsonl, tensorboard/).
    num_steps: total optimizer steps of the run (a resumed run continues up to it).
    seed: parameter initialisation and dropout RNG.
    accumulation_steps: microbatches per step; the data batch size must be divisible by it.
    init_checkpoint: a maxnucl checkpoint (e.g. a converted Gemma-2) to start from instead of
      random init; its architecture replaces the gin model's, while dtype, param_dtype,
      dropout_rate, remat_policy, scan_layers and attention_impl come from gin.  A resumed run
      keeps the architecture its checkpoints recorded (e.g. a pruned model's FFN widths).
    log_every: write metrics every N steps (and at the last step).
    eval_every: held-out NLL (`eval_loss`) every M steps and at the last step; 0 = never.
    eval_split, eval_batches: the held-out split of the training source and how many batches.
    eval_tasks: benchmarks run on the current params during training, e.g. `[@gsm8k()]` or
      `['gsm8k', 'perplexity']` (configured by their gin bindings; maxnucl.evaluate); their
      metrics are logged as "<name>/<metric>", their predictions written to
      WORKDIR/eval/<name>/step_<N>/ (a URL workdir too).  Generation uses the training data's
      vocabulary.  With several processes all of them generate and score, process 0 writes.
    eval_tasks_every: run them every N steps and at the last step (0 = with eval_every, or only
      at the last step when eval_every is 0).
    eval_tasks_limit: examples per benchmark (None = all).
    checkpoint_every: save every N steps (and at the last step).
    keep_checkpoints: how many step directories to keep.
    async_checkpointing: write checkpoints in the background while training continues.
    progress_bar: tqdm bar with ETA on stderr.
    mesh: a device mesh (default: `create_mesh()` from gin); tests pass one explicitly.
    allow_config_change: resume with gin bindings that differ from the run's (`config.gin`),
      recording the change in config_changes.jsonl (`maxnucl.run_guard`); without it such a
      resume is refused.

  Returns:
    {"state": final TrainState, "cfg": ModelConfig, "history": list of logged metric dicts,
     "workdir": path}.
  """
  _check_settings(num_steps=num_steps, accumulation_steps=accumulation_steps,
                  log_every=log_every, checkpoint_every=checkpoint_every,
                  keep_checkpoints=keep_checkpoints, eval_batches=eval_batches,
                  eval_every=(eval_every, 0), eval_tasks_every=(eval_tasks_every, 0))
  workdir = paths.as_path(workdir)  # a local path or a URL (gs://, file://)
  mesh = sharding.create_mesh() if mesh is None else mesh
  rules = sharding.logical_axis_rules()
  cfg = models.configured_model()
  if init_checkpoint is not None and not paths.as_path(init_checkpoint).exists():
    raise FileNotFoundError(f"train_loop.init_checkpoint {init_checkpoint} does not exist")
  student_cfg = cfg if init_checkpoint is None else _config_from_checkpoint(init_checkpoint, cfg)
  distillation = losses.distill()
  teacher = _Teacher.configured(distillation, student_cfg)
  schedule = learning_rate_schedule(num_steps)
  tx = create_optimizer(schedule)
  train_iter = pipeline.create_data_iterator("train", seed=seed)
  _check_data(cfg, train_iter, accumulation_steps, mesh)
  batch_sh = _batch_shardings(train_iter, mesh, rules)
  with sharding.activate(mesh, rules):  # the loss terms' settings
    _trace_step(student_cfg, tx, schedule, accumulation_steps, train_iter, teacher)
  evaluation = _Evaluation(eval_every, eval_split, eval_batches, eval_tasks, eval_tasks_every,
                           eval_tasks_limit, seed, batch_sh, train_iter, workdir)
  # Created once every setting, the data and the initial checkpoint have been checked; a run
  # refused after that (a compilation that fails, a checkpoint that does not fit) removes the
  # workdir it created: a refused run leaves nothing behind.
  primary = distributed.is_primary()  # the one process that prints, writes logs and locks
  fresh = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  lock = run_guard.Lock(workdir).acquire() if primary else None  # one trainer per workdir
  with (_removed_unless_started(workdir, fresh) as started, _released(lock),
        sharding.activate(mesh, rules)):
    manager = _checkpoint_manager(workdir, keep_checkpoints, async_checkpointing)
    cfg, state, seed, resume_step = _start(workdir, manager, cfg, tx, train_iter, seed,
                                           init_checkpoint, accumulation_steps, mesh, rules,
                                           allow_config_change, teacher)
    teacher.load(cfg, mesh, rules)  # once; not part of the checkpointed state
    rng = jax.random.PRNGKey(seed)
    programs = _Programs(cfg, tx, schedule, accumulation_steps, state, batch_sh, train_iter,
                         rng, mesh, rules, evaluation, teacher)
    logger = _Logger(workdir, resume_step or 0, cfg, train_iter, mesh, log_every, num_steps,
                     int(state["step"]), progress_bar and primary)
    start = int(state["step"])
    try:
      for step in range(start + 1, num_steps + 1):
        t_start = time.perf_counter()
        batch = _device_batch(next(train_iter), batch_sh)
        new_state, metrics = programs.train_step(state, batch, rng, teacher.params)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _refuse_non_finite(metrics, step, manager)
        state = new_state
        started.set()
        logger.step_done(time.perf_counter() - t_start)
        is_last = step == num_steps
        if logger.due(step, is_last) or evaluation.due(step, is_last):
          logger.log(step, metrics, programs.entropy(state["params"]),
                     evaluation.run(step, is_last, cfg, programs, state["params"], mesh, rules))
        if step % checkpoint_every == 0 or is_last:
          _save(manager, step, cfg, state, {"step": step, "seed": seed,
                                            "data_iterator": train_iter.get_state(),
                                            **teacher.record()})
        if step == start + 1 and primary and not (workdir / "operative_config.gin").exists():
          (workdir / "operative_config.gin").write_text(gin.operative_config_str())
    finally:
      logger.close()
      manager.wait_until_finished()
      manager.close()
  return {"state": state, "cfg": cfg, "history": logger.history, "workdir": workdir}


def _start(workdir, manager, cfg, tx, train_iter, seed, init_checkpoint, accumulation_steps,
           mesh, rules, allow_config_change, teacher: "_Teacher"
           ) -> tuple[ModelConfig, TrainState, int, Optional[int]]:
  """The state the loop starts from: the latest checkpoint's (with the run's configuration
  checked against the one it started with), or a new run's (random or `init_checkpoint`, its
  config.gin written).  A run started from `init_checkpoint` resumes with the architecture its
  checkpoints recorded (a pruned model's per-layer FFN widths), not gin's model.  Returns
  (cfg, state, seed, resumed step or None)."""
  primary = distributed.is_primary()
  resume_step = manager.latest_step()
  if resume_step is not None:  # the run's configuration stays what it was, unless allowed
    run_guard.check_resumed_config(workdir, gin.config_str(), resume_step, allow_config_change,
                                   primary)
  elif primary:
    (workdir / run_guard.CONFIG_NAME).write_text(gin.config_str())
  if init_checkpoint is not None:
    cfg = _config_from_checkpoint(init_checkpoint if resume_step is None
                                  else _step_dir(manager, resume_step), cfg, warn=False)
    _check_data(cfg, train_iter, accumulation_steps, mesh)
  state_sh = state_shardings(cfg, tx, mesh, rules)
  if resume_step is None:
    return cfg, _initial_state(cfg, tx, state_sh, seed, init_checkpoint, mesh, rules), seed, None
  resume_step, state, train_state = _restore_latest(manager, workdir, cfg, tx, state_sh)
  train_iter.set_state(train_state["data_iterator"])
  teacher.check_resumed(train_state, _step_dir(manager, resume_step))
  if primary:
    print(f"resumed from step {resume_step} ({_step_dir(manager, resume_step)})", flush=True)
  return cfg, state, train_state["seed"], resume_step


def _refuse_non_finite(metrics: dict, step: int, manager) -> None:
  bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(metrics[k])]
  if bad:
    last = manager.latest_step()
    raise NonFiniteLossError(
        f"non-finite {', '.join(bad)} at step {step} (loss={metrics['loss']}, grad_norm="
        f"{metrics['grad_norm']}, param_norm={metrics['param_norm']}); stopped without saving "
        f"this step's state; last good checkpoint: "
        f"{_step_dir(manager, last) if last is not None else 'none'}")


class _Teacher:
  """The frozen distillation teacher (`distill.teacher`; none when unbound): its config checked
  against the student's before anything is created, its params loaded once onto the student's
  mesh with the same logical sharding rules (data/fsdp/tensor), in `distill.teacher_dtype`, and
  passed to every train step.  Not part of the checkpointed state: a resume loads it again, and
  the checkpoint it was read from is recorded in each step's train_state."""

  def __init__(self, path: Optional[paths.Path] = None, cfg: Optional[ModelConfig] = None):
    self.path, self.cfg, self.params, self.shardings = path, cfg, None, None

  @classmethod
  def configured(cls, distillation: losses.Distillation, student: ModelConfig) -> "_Teacher":
    if distillation.teacher is None:
      return cls()
    path = checkpoints.resolve(distillation.teacher)  # a workdir: its latest step
    teacher = cls(path, checkpoints.load_config(path))
    teacher.check_vocabulary(student)
    dtype = distillation.teacher_dtype  # held and run in it; no dropout, no backward pass
    teacher.cfg = teacher.cfg.replace(dtype=dtype, param_dtype=dtype, dropout_rate=0.0,
                                      remat_policy="none", scan_layers=student.scan_layers,
                                      attention_impl=student.attention_impl)
    return teacher

  def check_vocabulary(self, student: ModelConfig) -> None:
    if self.cfg.vocab_size != student.vocab_size:
      raise TrainingError(f"distill.teacher {self.path} has vocab_size {self.cfg.vocab_size} but "
                          f"the student {student.name!r} has {student.vocab_size}: "
                          f"distillation needs the same vocabulary")

  def load(self, student: ModelConfig, mesh: Mesh, rules: sharding.Rules) -> None:
    if self.path is None:
      return
    self.check_vocabulary(student)
    self.shardings = sharding.tree_shardings(models.logical_axes(self.cfg),
                                             models.abstract_params(self.cfg), mesh, rules)
    _, params = checkpoints.load(self.path, mesh=mesh, rules=rules, dtype=self.cfg.param_dtype)
    self.params = jax.tree.map(jax.device_put, params, self.shardings)
    log.info("distillation teacher %s (%s, FFN widths %s, %s)", self.path, self.cfg.name,
             list(self.cfg.layer_ffn_widths), self.cfg.param_dtype)

  def record(self) -> dict:
    """What a checkpoint's train_state records of the teacher."""
    return {} if self.path is None else {"teacher": str(self.path)}

  def check_resumed(self, train_state: dict, step_dir) -> None:
    """A resume whose teacher is not the one the run was trained with is warned about (the gin
    binding `distill.teacher` itself cannot change without --allow_config_change; a workdir
    teacher can have moved on to a later step)."""
    recorded = train_state.get("teacher")
    if recorded != self.record().get("teacher"):
      log.warning("%s was trained with distill.teacher %s; resuming with %s", step_dir,
                  recorded, self.path)


class _Programs:
  """The compiled train step, eval step and outgoing entropy of a run, compiled before the loop,
  each between two lines (compilation.compile_announced)."""

  def __init__(self, cfg, tx, schedule, accumulation_steps, state, batch_sh, train_iter, rng,
               mesh, rules, evaluation: "_Evaluation", teacher: _Teacher):
    state_sh = state_shardings(cfg, tx, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(
        functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule,
                          accumulation_steps=accumulation_steps, teacher_cfg=teacher.cfg),
        in_shardings=(state_sh, batch_sh, replicated, teacher.shardings),
        out_shardings=(state_sh, replicated), donate_argnums=0)
    self.entropy_fn = jax.jit(lambda p: jnp.sum(losses.outgoing_entropy(p, cfg)),
                              in_shardings=(state_sh["params"],), out_shardings=replicated)
    abstract_batch = _abstract_batch(train_iter, batch_sh)
    shape = f"{cfg.name}, batch {train_iter.batch_size}×{train_iter.seq_len}"
    self.train_step = compilation.compile_announced(step_fn, state, abstract_batch, rng,
                                                    teacher.params,
                                                    what=f"the train step ({shape})")
    self.eval_step = None
    if evaluation.eval_every:
      eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg),
                        in_shardings=(state_sh["params"], batch_sh), out_shardings=replicated)
      self.eval_step = compilation.compile_announced(eval_fn, state["params"], abstract_batch,
                                                     what=f"the eval step ({shape})")
      evaluation.announce()

  def entropy(self, params) -> float:
    return float(self.entropy_fn(params))


class _Evaluation:
  """What the loop evaluates and when: the held-out NLL (`eval_every`) and the benchmarks
  (`eval_tasks`, every `eval_tasks_every`), both at the last step too.  Built, with its data,
  before the workdir is created."""

  def __init__(self, eval_every, eval_split, eval_batches, eval_tasks, eval_tasks_every,
               eval_tasks_limit, seed, batch_sh, train_iter, workdir):
    self.eval_every, self.split, self.batches = eval_every, eval_split, eval_batches
    self.data = _eval_batches(eval_split, eval_batches, seed, batch_sh) if eval_every else []
    self.benchmarks = _benchmarks(eval_tasks, train_iter)
    self.tasks_every = eval_tasks_every or eval_every
    self.tasks_limit, self.train_iter, self.workdir = eval_tasks_limit, train_iter, workdir

  def announce(self) -> None:
    if distributed.is_primary():
      print(f"eval_loss: {perplexity.scored_tokens(self.train_iter.metadata['loss_on_inputs'])}"
            f", {self.batches} batches of {self.train_iter.metadata['source']} {self.split}",
            flush=True)

  def _nll_due(self, step: int, is_last: bool) -> bool:
    return bool(self.eval_every) and (is_last or step % self.eval_every == 0)

  def _tasks_due(self, step: int, is_last: bool) -> bool:
    return bool(self.benchmarks) and (is_last or bool(self.tasks_every
                                                      and step % self.tasks_every == 0))

  def due(self, step: int, is_last: bool) -> bool:
    return self._nll_due(step, is_last) or self._tasks_due(step, is_last)

  def run(self, step, is_last, cfg, programs: _Programs, params, mesh, rules) -> dict:
    """{"eval_loss": ..., "<benchmark>/<metric>": ...} of what is due at `step`."""
    out = {}
    if self._nll_due(step, is_last):
      out["eval_loss"] = perplexity.heldout_nll(cfg, params, self.data,
                                                step_fn=programs.eval_step)["nll"]
    if self._tasks_due(step, is_last):
      out.update(_run_benchmarks(self.benchmarks, cfg, params, self.train_iter, step,
                                 self.workdir, self.tasks_limit, mesh, rules))
    return out


class _Logger:
  """metrics.jsonl, TensorBoard and the progress bar (process 0), and throughput over the steps
  since the last log (data loading included; logging, evaluation and checkpointing excluded)."""

  def __init__(self, workdir, resume_step, cfg, train_iter, mesh, log_every, num_steps, start,
               show_progress):
    primary = distributed.is_primary()
    self.log_every, self.history = log_every, []
    self.metrics_log = _MetricsLog(workdir, resume_step) if primary else _NoMetricsLog()
    self.tokens = train_iter.batch_size * train_iter.seq_len
    self.step_flops = flops.training_flops_per_step(cfg, train_iter.batch_size,
                                                    train_iter.seq_len)
    self.peak = flops.peak_flops_per_device()
    self.num_devices = mesh.devices.size
    if self.peak is None:
      log.info("mfu is reported as null: no peak FLOP/s known for device kind %r (bind "
               "peak_flops_per_device.value to set one)", jax.devices()[0].device_kind)
    self.interval_time, self.interval_steps = 0.0, 0
    self.bar = _progress(start, num_steps, show_progress)

  def step_done(self, seconds: float) -> None:
    self.interval_time, self.interval_steps = self.interval_time + seconds, self.interval_steps + 1
    self.bar.update(1)

  def due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.log_every == 0

  def log(self, step: int, metrics: dict, entropy: float, evaluations: dict) -> None:
    step_time = self.interval_time / self.interval_steps
    self.interval_time, self.interval_steps = 0.0, 0
    tflops = self.step_flops / step_time / self.num_devices / 1e12
    record = {"step": step, **metrics, "outgoing_entropy": entropy, "step_time_s": step_time,
              "tokens_per_s": self.tokens / step_time, "tflops_per_device": tflops,
              "mfu": tflops * 1e12 / self.peak if self.peak else None, **evaluations}
    self.metrics_log.write(record)
    self.history.append(record)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", nll=f"{record['nll']:.4f}",
                         **({"kl": f"{record['distill_kl']:.4f}"} if "distill_kl" in record
                            else {}))

  def close(self) -> None:
    self.bar.close()
    self.metrics_log.close()


# ---- optimizer and learning-rate schedule (gin) -------------------------------------------------

@gin.configurable(denylist=["num_steps"])
def learning_rate_schedule(num_steps: int, *, peak_learning_rate: float = 1e-6,
                           warmup_steps: int = 100, decay: str = "constant",
                           final_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_learning_rate` over `warmup_steps`, then `decay`.

  decay: "constant"; "cosine" or "linear" to `final_fraction * peak` at `num_steps`.
  """
  _check_number("learning_rate_schedule.peak_learning_rate", peak_learning_rate)
  _check_settings_of("learning_rate_schedule", warmup_steps=(warmup_steps, 0))
  if not _is_number(final_fraction) or not 0 <= final_fraction <= 1:
    raise ValueError(f"learning_rate_schedule.final_fraction = {final_fraction!r}: expected a "
                     f"number in [0, 1]")
  decay_steps = max(num_steps - warmup_steps, 1)
  end = final_fraction * peak_learning_rate
  decays = {
      "constant": lambda: optax.constant_schedule(peak_learning_rate),
      "cosine": lambda: optax.cosine_decay_schedule(peak_learning_rate, decay_steps,
                                                    alpha=final_fraction),
      "linear": lambda: optax.linear_schedule(peak_learning_rate, end, decay_steps),
  }
  if decay not in decays:
    raise ValueError(f"learning_rate_schedule.decay = {decay!r}; expected one of {sorted(decays)}")
  if warmup_steps <= 0:
    return decays[decay]()
  warmup = optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decays[decay]()], [warmup_steps])


def _adafactor(schedule, *, weight_decay, decay_rate=0.8, multiply_by_parameter_scale=True,
               clipping_threshold=1.0, momentum=None, factored=True, **unused):
  return optax.adafactor(schedule, decay_rate=decay_rate,
                         multiply_by_parameter_scale=multiply_by_parameter_scale,
                         clipping_threshold=clipping_threshold, momentum=momentum,
                         factored=factored, weight_decay_rate=weight_decay or None)


def _adamw(schedule, *, weight_decay, b1=0.9, b2=0.999, eps=1e-8, **unused):
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adafactor": _adafactor,
    "adamw": _adamw,
}


@gin.configurable(denylist=["schedule"])
def create_optimizer(schedule: optax.Schedule, *, name: str = "adafactor",
                     grad_clip_norm: Optional[float] = 1.0, weight_decay: float = 0.0,
                     **options: Any) -> optax.GradientTransformation:
  """Global-norm gradient clipping followed by a registered optimizer.

  name: a key of OPTIMIZERS.  options: that optimizer's own settings, e.g. for adafactor
  decay_rate, multiply_by_parameter_scale, clipping_threshold, momentum, factored; for adamw
  b1, b2, eps.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"create_optimizer.name = {name!r}; expected one of {sorted(OPTIMIZERS)}")
  known = {"adafactor": {"decay_rate", "multiply_by_parameter_scale", "clipping_threshold",
                         "momentum", "factored"}, "adamw": {"b1", "b2", "eps"}}[name]
  unknown = sorted(set(options) - known)
  if unknown:
    raise ValueError(f"create_optimizer: option(s) {unknown} are not settings of {name!r}; "
                     f"its settings: {sorted(known)}")
  # A negative clipping norm flips every gradient (optax scales by norm / max(norm, limit)).
  if grad_clip_norm is not None and not (_is_number(grad_clip_norm) and grad_clip_norm > 0):
    raise ValueError(f"create_optimizer.grad_clip_norm = {grad_clip_norm!r}: expected a number "
                     f"> 0, or None for no clipping")
  _check_number("create_optimizer.weight_decay", weight_decay)
  for option, value in options.items():
    if not isinstance(value, bool) and value is not None and not _is_number(value):
      raise ValueError(f"create_optimizer.{option} = {value!r}: expected a finite number")
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm is not None else []
  return optax.chain(*chain, OPTIMIZERS[name](schedule, weight_decay=weight_decay, **options))


# ---- shardings and state ------------------------------------------------------------------------

def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """NamedShardings of the train state: params by their logical axes; optimizer statistics
  shaped like a param (Adam moments, unfactored Adafactor) share its sharding; the rest
  (factored Adafactor rows/columns, counts) is replicated."""
  abstract = models.abstract_params(cfg)
  param_sh = sharding.tree_shardings(models.logical_axes(cfg), abstract, mesh, rules)
  opt_abstract = jax.eval_shape(tx.init, abstract)
  return {"params": param_sh, "opt_state": _like_params(opt_abstract, abstract, param_sh, mesh),
          "step": NamedSharding(mesh, PartitionSpec())}


def _like_params(opt_abstract, abstract_params, param_sh, mesh):
  by_path = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    by_path[_keys(path)] = (tuple(leaf.shape), None)
  for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]:
    by_path[_keys(path)] = (by_path[_keys(path)][0], sh)
  replicated = NamedSharding(mesh, PartitionSpec())

  def choose(path, leaf):
    keys = _keys(path)
    for i in range(len(keys)):
      shape, sh = by_path.get(keys[i:], (None, None))
      if shape is not None and shape == tuple(leaf.shape):
        return sh
    return replicated
  return jax.tree_util.tree_map_with_path(choose, opt_abstract)


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _initial_state(cfg, tx, state_sh, seed, init_checkpoint, mesh, rules) -> TrainState:
  if init_checkpoint is not None:
    _, params = checkpoints.load(init_checkpoint, mesh=mesh, rules=rules, dtype=cfg.param_dtype)
    params = jax.tree.map(jax.device_put, params, state_sh["params"])
    log.info("initialised params from %s", init_checkpoint)
  else:
    params = models.init(cfg, jax.random.PRNGKey(seed), shardings=state_sh["params"])
  opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])
  return {"params": params, "opt_state": opt_state, "step": step}


ARCHITECTURE_FROM_GIN = ("dtype", "param_dtype", "dropout_rate", "remat_policy", "scan_layers",
                         "attention_impl")


def _config_from_checkpoint(path, gin_cfg: ModelConfig, warn: bool = True) -> ModelConfig:
  """The checkpoint's architecture with the gin model's numerics and training settings."""
  ckpt_cfg = checkpoints.load_config(path)
  cfg = ckpt_cfg.replace(**{f: getattr(gin_cfg, f) for f in ARCHITECTURE_FROM_GIN})
  differ = [f.name for f in dataclasses.fields(cfg)
            if f.name != "name" and getattr(cfg, f.name) != getattr(gin_cfg, f.name)]
  if differ and warn:
    log.warning("init_checkpoint %s: its architecture replaces the gin model %r; fields that "
                "differ: %s", path, gin_cfg.name, differ)
  return cfg


# ---- data ---------------------------------------------------------------------------------------

def _check_data(cfg, it, accumulation_steps, mesh):
  if it.vocab_size > cfg.vocab_size:
    raise TrainingError(f"data vocabulary has {it.vocab_size} ids but model {cfg.name!r} has "
                        f"vocab_size {cfg.vocab_size}")
  if it.seq_len > cfg.max_positions:
    raise TrainingError(f"create_data_iterator.seq_len = {it.seq_len} is longer than model "
                        f"{cfg.name!r}'s max_positions {cfg.max_positions}")
  global_batch = it.batch_size
  if global_batch % accumulation_steps:
    raise TrainingError(f"batch size {global_batch} is not divisible by "
                        f"train_loop.accumulation_steps = {accumulation_steps}")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (global_batch // accumulation_steps) % shards:
    raise TrainingError(f"microbatch size {global_batch // accumulation_steps} is not divisible "
                        f"by the {shards} data x fsdp shards of mesh {dict(mesh.shape)}")


def _trace_step(cfg, tx, schedule, accumulation_steps, it, teacher: _Teacher) -> None:
  """Traces the train step on abstract values (no compilation, no memory): settings that only
  the step reads (the loss terms, their weights, the normalization, a distillation term without
  a teacher or a teacher without the term) fail here, before the workdir is created."""
  params = models.abstract_params(cfg)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  batch = _abstract_batch(it, {k: None for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                  "positions")})
  teacher_params = None if teacher.cfg is None else models.abstract_params(teacher.cfg)
  jax.eval_shape(functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule,
                                   accumulation_steps=accumulation_steps, teacher_cfg=teacher.cfg),
                 state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32), teacher_params)


class _Started:
  """Set once the run's first step is done."""

  def __init__(self):
    self.done = False

  def set(self) -> None:
    self.done = True


@contextlib.contextmanager
def _removed_unless_started(workdir: paths.Path, fresh: bool):
  """Removes `workdir` again when it did not exist before this run (`fresh`) and the run stops
  before its first step is done: everything in it is then this run's config.gin, lock and empty
  checkpoints/."""
  started = _Started()
  try:
    yield started
  except BaseException:
    if fresh and not started.done and distributed.is_primary() and workdir.exists():
      paths.remove_tree(workdir)
    raise


@contextlib.contextmanager
def _released(lock: Optional[run_guard.Lock]):
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _batch_shardings(it, mesh, rules) -> dict:
  shape = (it.batch_size, it.seq_len)
  spec = sharding.logical_to_spec(BATCH_AXES, shape, mesh, rules)
  return {k: NamedSharding(mesh, spec) for k in
          ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def _abstract_batch(it, batch_sh) -> dict:
  shape = (it.batch_size, it.seq_len)
  dtypes = {"loss_mask": jnp.float32}
  return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=sh)
          for k, sh in batch_sh.items()}


def _device_batch(local: dict, batch_sh: dict) -> dict:
  """This host's rows -> global arrays sharded over ('data', 'fsdp')."""
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(local[k]))
          for k, sh in batch_sh.items()}


def _eval_batches(split, num_batches, seed, batch_sh) -> list:
  it = pipeline.create_data_iterator(split, seed=seed, shuffle=False, repeat=False)
  out = []
  for batch in it:
    if len(out) == num_batches:
      break
    out.append(_device_batch(batch, batch_sh))
  return out


def _check_settings(**values) -> None:
  """Refuse nonsensical train_loop settings (before anything is created), naming the binding.
  Each value must be an integer >= 1, or >= the minimum given with it as (value, minimum)."""
  _check_settings_of("train_loop", **values)


def _check_settings_of(configurable: str, **values) -> None:
  for name, value in values.items():
    value, minimum = value if isinstance(value, tuple) else (value, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise TrainingError(f"{configurable}.{name} = {value!r}: expected an integer >= {minimum}")


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_number(binding: str, value: Any) -> None:
  """A rate or weight: a finite number >= 0."""
  if not _is_number(value) or value < 0:
    raise ValueError(f"{binding} = {value!r}: expected a finite number >= 0")


def _benchmarks(eval_tasks, train_iter) -> list:
  out = [evaluate.get_benchmark(t) if isinstance(t, str) else t for t in eval_tasks]
  for bench in out:
    if getattr(bench, "vocab", "unset") is None:  # perplexity: the training data's vocabulary
      bench.vocab = train_iter.metadata["vocab"]
  return out


def _run_benchmarks(benchmarks, cfg, params, train_iter, step, workdir, limit, mesh,
                    rules) -> dict:
  """Each benchmark on the current params; {"<name>/<metric>": value}, the same on every
  process.  With several processes all generate and score together (the model's calls are
  collective) and process 0 alone writes WORKDIR/eval/<name>/step_<N>/ (`core.run_benchmark`)."""
  model = core.LanguageModel(cfg, params,
                             vocabularies.get_tokenizer(train_iter.metadata["vocab"]),
                             batch_size=train_iter.batch_size, mesh=mesh, rules=rules)
  out = {}
  for bench in benchmarks:
    # in a URL workdir: written locally, then published (replacing a step evaluated before a
    # resume)
    step_folder = workdir / "eval" / bench.name / f"step_{step}"
    with core.written_to(step_folder, overwrite=True) as folder:
      results = core.run_benchmark(bench, model, folder, limit=limit, progress=False,
                                   checkpoint=f"step {step}")
    out.update({f"{bench.name}/{k}": float(v) for k, v in results["metrics"].items()
                if isinstance(v, (int, float))})
  return out


# ---- checkpoints --------------------------------------------------------------------------------

def _checkpoint_manager(workdir, keep, async_checkpointing) -> ocp.CheckpointManager:
  # In a URL workdir a step is finished by its commit marker, as Orbax does on GCS by default
  # (and as checkpoints.resolve expects there): a file:// URL workdir behaves as a bucket.
  commit_file = ocp.path.atomicity.CommitFileTemporaryPath if paths.is_url(workdir) else None
  return ocp.CheckpointManager(
      paths.orbax_path(workdir / "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_checkpointing,
                                           temporary_path_class=commit_file),
      item_names=(PARAMS, OPT_STATE, MODEL_CONFIG, TRAIN_STATE))


def _step_dir(manager, step):
  return manager.directory / str(step)  # an epath path: gs:// stays a URL


def _save(manager, step, cfg, state, train_state) -> None:
  manager.save(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.PyTreeSave(state["params"],
                                  save_args=checkpoints.save_args(state["params"]),
                                  custom_metadata=checkpoints.params_metadata(state["params"])),
      OPT_STATE: ocp.args.PyTreeSave(state["opt_state"]),
      MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict()),
      TRAIN_STATE: ocp.args.JsonSave(train_state)}))


class CorruptCheckpointError(TrainingError):
  """A committed checkpoint whose array data cannot be read."""


def _restore_latest(manager, workdir, cfg, tx, state_sh) -> tuple[int, TrainState, dict]:
  """The newest checkpoint that can be read.  A corrupted one is moved aside, nothing deleted,
  to `corrupted_step_<N>` (`.2`, `.3`, ... when that name is taken) with a warning, and the
  previous one is used.  In a URL workdir the move is a copy, marked complete before the
  original is deleted (`outputs.move_aside`): a run killed meanwhile never loses the step."""
  while True:
    step = manager.latest_step()
    try:
      return (step,) + _restore(manager, step, cfg, tx, state_sh)
    except CorruptCheckpointError as e:
      earlier = [s for s in manager.all_steps() if s < step]
      if not earlier:
        raise TrainingError(f"{e}; there is no earlier checkpoint to resume from (remove "
                            f"{_step_dir(manager, step)} to start over)") from None
      # named through the workdir: a file:// URL workdir moves its steps as a bucket does
      # (Orbax is given its local path); process 0 moves it, the others wait for where to
      aside = distributed.on_primary(lambda: str(outputs.move_aside(
          workdir / "checkpoints" / str(step), f"corrupted_step_{step}")))
      manager.reload()
      log.warning("%s; moved it to %s and resuming from the previous checkpoint, step %d", e,
                  aside, max(earlier))


_UNREADABLE = "Encountered error while reading"  # TensorStore's message for bad array data


def _unreadable_array(error: BaseException) -> str:
  """The array an Orbax/TensorStore read error names ("params/layers_1.mlp.out"), or "?"."""
  text = str(error)
  item = re.search(r"'path': '[^']*/([a-z_]+)/'", text)
  leaf = re.search(r"'path': '([^'/][^']*)/'", text)
  return (f"{item.group(1)}/" if item else "") + (leaf.group(1) if leaf else "?")


def _restore(manager, step, cfg, tx, state_sh) -> tuple[TrainState, dict]:
  abstract = {"params": models.abstract_params(cfg)}
  abstract["opt_state"] = jax.eval_shape(tx.init, abstract["params"])

  def target(name):
    tree = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract[name], state_sh[name])
    return ocp.args.PyTreeRestore(tree, ocp.checkpoint_utils.construct_restore_args(tree))

  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: target("params"), OPT_STATE: target("opt_state"),
        TRAIN_STATE: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 - bad data and a changed model raise different types
    if _UNREADABLE in str(e):
      raise CorruptCheckpointError(
          f"checkpoint {_step_dir(manager, step)} is corrupted: array {_unreadable_array(e)} "
          f"cannot be read ({str(e).split('. See full')[0][:200]})") from None
    if not isinstance(e, ValueError):
      raise
    raise TrainingError(
        f"cannot resume from {_step_dir(manager, step)}: its params or optimizer state do not "
        f"match the configured model {cfg.name!r} and optimizer (was the model, "
        f"create_optimizer.* or the gradient clipping changed since it was written? use a new "
        f"--workdir, or train_loop.init_checkpoint to start from its params): {e}") from e
  try:  # the params against the checksums recorded when they were saved (values as trained)
    checkpoints.verify_params(_step_dir(manager, step), restored[PARAMS], allow_nonfinite=True)
  except checkpoints.CheckpointError as e:
    raise CorruptCheckpointError(f"checkpoint {_step_dir(manager, step)} is corrupted: "
                                 f"{e}") from None
  train_state = restored[TRAIN_STATE]
  state = {"params": restored[PARAMS], "opt_state": restored[OPT_STATE],
           "step": jax.device_put(jnp.asarray(train_state["step"], jnp.int32), state_sh["step"])}
  return state, train_state


# ---- metrics ------------------------------------------------------------------------------------

def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without its optional `import torch` (about 2 s per
  process where torch is installed; it only serves logging torch tensors, which maxnucl never
  does).  Where torch is already imported, tensorboardX gets it as usual."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class _MetricsLog:
  """DIR/metrics.jsonl and TensorBoard; on resume, lines after the restored step are dropped (they
  will be written again by the resumed run), and TensorBoard is made to hold the kept lines."""

  def __init__(self, workdir: paths.Path, resume_step: int):
    SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
    self.path = workdir / "metrics.jsonl"
    logged = ([(line, json.loads(line)) for line in _logged_lines(self.path)]
              if self.path.exists() else [])
    kept = [(line, record) for line, record in logged if record["step"] <= resume_step]
    self.lines = [line for line, _ in kept]
    if self.path.exists():
      self.path.write_text("".join(line + "\n" for line in self.lines))
    # A bucket object cannot be appended to: in a URL workdir the file is rewritten whole.
    self.file = None if paths.is_url(self.path) else self.path.open("a")
    # The events a killed run left are not those of metrics.jsonl: tensorboardX writes them from a
    # queue in a thread of its own, so `flush` does not wait for the last steps' (and a bucket's
    # event file is uploaded once per flush_secs). On resume TensorBoard is made to drop every
    # event from the first kept line's step on (purge_step), and the kept lines are logged again.
    purge_step = kept[0][1]["step"] if kept else resume_step + 1
    self.writer = SummaryWriter(paths.tensorboard_logdir(workdir / "tensorboard"),
                                purge_step=purge_step if resume_step else None)
    for _, record in kept:
      self._add_scalars(record)

  def _add_scalars(self, record: dict) -> None:
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, record["step"])

  def write(self, record: dict) -> None:
    if self.file is None:
      self.lines.append(json.dumps(record))
      self.path.write_text("".join(line + "\n" for line in self.lines))
    else:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()
    self._add_scalars(record)
    self.writer.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    self.writer.close()


class _NoMetricsLog:
  """What processes other than 0 log: nothing (process 0 writes metrics.jsonl and TensorBoard)."""

  def write(self, record: dict) -> None:
    del record

  def close(self) -> None:
    pass


def _logged_lines(path: paths.Path) -> list[str]:
  """The complete lines of a metrics.jsonl; a last line cut short by a crash is dropped with a
  warning (a malformed line elsewhere is an error naming it)."""
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  for number, line in enumerate(lines, 1):
    try:
      json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        log.warning("%s: dropping its incomplete last line %d (the run stopped while writing it)",
                    path, number)
        return lines[:-1]
      raise TrainingError(f"{path}, line {number}: not valid JSON ({e})") from None
  return lines


def _progress(start, total, enabled):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
              dynamic_ncols=True)


# ---- command line -------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m maxnucl.train", description=__doc__.split("\n\n")[0],
      epilog="Example: python -m maxnucl.train --gin_file=gin/demo_cpu.gin --workdir=/tmp/demo. "
             "See docs/training.md.")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. \"train_loop.num_steps = 50\" (repeatable, applied "
                           "after the files)")
  parser.add_argument("--workdir", default=None,
                      help="output directory (default: train_main.workdir in gin)")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume with bindings that differ from the run's config.gin (the "
                           "change is recorded in WORKDIR/config_changes.jsonl with its step); "
                           "without it such a resume is refused")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  # force: importing Orbax already installed a root handler; INFO for maxnucl's own lines only
  # (gin, Orbax and absl log every include and save at INFO)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      force=True)
  logging.getLogger("maxnucl").setLevel(logging.INFO)
  outputs.hide_failed_write_noise()  # a full disk: reported below in one line, not per thread
  if not args.gin_file:
    parser.error("at least one --gin_file is required (e.g. gin/demo_cpu.gin)")
  try:
    distributed.initialize_from_args(args)
    parse_gin(args.gin_file, args.gin_param)
    workdir = args.workdir or train_main()
    with outputs.failed_writes_raised(workdir):
      result = train_loop(workdir, allow_config_change=args.allow_config_change)
  except NonFiniteLossError as e:
    print(f"error: {distributed.label()}{gin_config.error_message(e)}", file=sys.stderr)
    return 3
  except outputs.WriteFailed as e:  # a failure while working, not bad input
    print(f"error: {distributed.label()}{e}", file=sys.stderr)
    return 1
  except (OSError, ValueError, KeyError, TrainingError, checkpoints.CheckpointError,
          SyntaxError, run_guard.WorkdirInUse) as e:
    print(f"error: {distributed.label()}{gin_config.error_message(e)}", file=sys.stderr)
    return 2
  if distributed.is_primary():
    _print_outputs(result)
  return 0


def cli() -> None:
  """The `maxnucl-train` / `python -m maxnucl.train` entry point: `main`, then `exit_process`."""
  code = main()
  # exit 1: a save failed for lack of space, reported in one line; Orbax's writers blocked on it
  # are expected, and a line naming them after that one would only blur it
  exit_process(code, name_stuck_threads=code != 1)


def exit_process(code: int, grace_s: float = 10.0, name_stuck_threads: bool = True) -> None:
  """Exit with `code`.  After a failure, threads that are still running (Orbax's background
  writers blocked on a failed save, a data worker) would keep the interpreter alive forever:
  they get `grace_s` to finish, then the process ends without waiting for them (named in a
  warning, with `name_stuck_threads`)."""
  if code:
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
      if thread is not threading.main_thread() and not thread.daemon:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
      (log.warning if name_stuck_threads else log.debug)(
          "exiting without waiting for threads still running: %s", ", ".join(stuck))
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


@gin.configurable
def train_main(workdir: str = "/tmp/maxnucl_train") -> str:
  """gin holder of the default workdir (the --workdir flag overrides it)."""
  return workdir


def _print_outputs(result: dict) -> None:
  workdir = result["workdir"]
  if result["history"]:
    last = result["history"][-1]
    print(f"\nfinished at step {last['step']}: " + _summary_metrics(last))
  else:  # a rerun of a run that had already reached num_steps
    metrics_file = workdir / "metrics.jsonl"
    logged = _logged_lines(metrics_file) if metrics_file.exists() else []
    last = json.loads(logged[-1]) if logged else {}
    print(f"\nalready complete at step {int(result['state']['step'])} (nothing to do)"
          + (f"; last logged step {last['step']}: " + _summary_metrics(last) if last else ""))
  print(f"checkpoints: {workdir / 'checkpoints'}")
  print(f"metrics:     {workdir / 'metrics.jsonl'}")
  print(f"tensorboard: tensorboard --logdir {workdir / 'tensorboard'}")



def _summary_metrics(record: dict) -> str:
  return ", ".join(f"{k} {record[k]:.4g}" for k in ("loss", "nll", "distill_kl", "eval_loss")
                   if record.get(k) is not None)
