"""Held-out token NLL and perplexity: the one implementation the trainer's `eval_loss`, the
pruner's `--eval_perplexity` and `python -m maxnucl.evaluate --gin_file=gin/eval/perplexity.gin`
all use.

    sums, counts = row_nll(params, batch, cfg=cfg)   # per row, via losses.nll
    heldout_nll(cfg, params, batches)                # {"nll", "perplexity", "tokens"}
    heldout_nll(cfg, params, batches, mesh=mesh)     # the same with params sharded on a mesh

NLL is the mean next-token negative log-likelihood (nats) over the tokens with loss_mask > 0;
perplexity = exp(NLL).  Batches follow the data pipeline's convention (`tokens`, `targets`,
`loss_mask`, `segment_ids`, `positions` [B, L]).

On a mesh (params restored sharded by `checkpoints.load(path, mesh=, rules=)`), every process
passes the same host batch; `global_batch` pads its rows to a multiple of the batch shards
(padding rows have loss_mask 0, so they add nothing) and places it as one global array sharded
over the `activation_batch` mesh axes, and the jitted NLL returns replicated sums, which every
process can read back (multi-process runs included).

The `Perplexity` benchmark reads a registered task's split (packed rows of `seq_len` tokens, as
the trainer sees them) or a local text file (tokenized with the model's vocabulary after BOS, cut
into rows of `seq_len` predicted tokens).  Like the trainer's `eval_loss`, it scores a task's
target tokens only by default; `loss_on_inputs = True` counts the prompt tokens too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Callable, Iterable, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import compilation, losses, models, sharding
from maxnucl.data import caching, catalog, packing, pipeline, vocabularies
from maxnucl.evaluation.core import EvaluationError, LanguageModel, stored_count
from maxnucl.models.config import ModelConfig


def row_nll(params: dict, batch: dict, *, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Summed next-token NLL of each row ([B], `losses.nll` with "sum") and its loss tokens [B]."""
  logits = models.apply(cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"])

  def one_row(row_logits, targets, mask):
    return losses.nll(row_logits[None], {"targets": targets[None], "loss_mask": mask[None]},
                      "sum")

  mask = batch["loss_mask"].astype(jnp.float32)
  return jax.vmap(one_row)(logits, batch["targets"], mask), jnp.sum(mask, axis=1)


def _describe_nll_step(arguments: dict) -> str:
  return (f"the NLL step ({arguments['cfg'].name}, batch "
          f"{compilation.shape_text(arguments['batch']['tokens'])})")


@compilation.announced_jit(what=_describe_nll_step, static_argnames=("cfg",))
def _row_nll_jit(params, batch, *, cfg):
  return row_nll(params, batch, cfg=cfg)


# ---- placement on a mesh ------------------------------------------------------------------------

def batch_shards(mesh: Optional[Mesh], rules: Optional[sharding.Rules] = None) -> int:
  """Into how many pieces a batch's rows are split on `mesh` (1 without one): the product of the
  mesh axes that the `activation_batch` rule names (('data', 'fsdp') by default)."""
  if mesh is None:
    return 1
  rules = sharding.logical_axis_rules() if rules is None else rules
  axes = dict(rules).get("activation_batch")
  axes = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(batch: dict, mesh: Optional[Mesh] = None,
                 rules: Optional[sharding.Rules] = None) -> dict[str, jax.Array]:
  """A host batch (numpy [B, ...], the same on every process) as the jitted functions' input.

  Without a mesh: on the default device.  With one: rows padded with all-zero rows (loss_mask 0,
  segment_ids 0: they add nothing to any sum) to a multiple of `batch_shards`, then one global
  array per key, sharded over the batch axis (`jax.make_array_from_process_local_data` with the
  global shape: every process passes the whole batch and keeps its devices' rows).
  """
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  rules = sharding.logical_axis_rules() if rules is None else rules
  batch = {k: np.asarray(v) for k, v in batch.items()}
  rows = len(next(iter(batch.values())))
  padding = -rows % batch_shards(mesh, rules)
  out = {}
  for key, value in batch.items():
    if padding:
      value = np.concatenate([value, np.zeros((padding,) + value.shape[1:], value.dtype)])
    spec = sharding.logical_to_spec(("activation_batch",) + (None,) * (value.ndim - 1),
                                    value.shape, mesh, rules)
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value,
                                                      value.shape)
  return out


def place_params(cfg: ModelConfig, params: dict, mesh: Mesh, rules: sharding.Rules) -> dict:
  """`params` in their shardings on `mesh` (the layout `checkpoints.load(mesh=, rules=)`
  restores; arrays already placed so are not moved)."""
  shardings = sharding.tree_shardings(models.logical_axes(cfg), params, mesh, rules)
  return jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s
                      else jax.device_put(x, s), params, shardings)


@functools.lru_cache(maxsize=16)
def nll_step(cfg: ModelConfig, mesh: Optional[Mesh] = None,
             rules: Optional[sharding.Rules] = None) -> Callable:
  """`step(params, batch) -> (sums [B], counts [B])`: the jitted `row_nll`.

  With a mesh: params and `global_batch` batches keep their shardings, activations are
  constrained by `rules` (`sharding.activate` around every call) and the per-row results come
  back replicated, so `jax.device_get` works on every process of a multi-process run (a sharded
  result is not addressable from one host).
  """
  if mesh is None:
    return functools.partial(_row_nll_jit, cfg=cfg)
  rules = sharding.logical_axis_rules() if rules is None else rules
  jitted = compilation.AnnouncedJit(functools.partial(row_nll, cfg=cfg), _describe_nll_step,
                                    out_shardings=NamedSharding(mesh, PartitionSpec()))

  def step(params, batch):
    with sharding.activate(mesh, rules):
      return jitted(place_params(cfg, params, mesh, rules), batch)
  return step


# ---- held-out NLL -------------------------------------------------------------------------------

def scored_tokens(loss_on_inputs: bool) -> str:
  """Which tokens a held-out NLL averages over, as the trainer and the evaluator print it."""
  return ("NLL over input and target tokens" if loss_on_inputs
          else "NLL over target tokens only (inputs not scored)")


def summarize(nll_sum: float, tokens: float) -> dict[str, float]:
  if tokens <= 0:
    raise EvaluationError("the held-out data has no loss tokens (loss_mask is zero everywhere)")
  nll = nll_sum / tokens
  return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": tokens}


def heldout_nll(cfg: ModelConfig, params: dict, batches: Iterable[dict],
                step_fn: Optional[Callable] = None, *, mesh: Optional[Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> dict[str, float]:
  """{"nll", "perplexity", "tokens"} over `batches`.  `step_fn(params, batch)` -> (sums, counts)
  replaces the jitted `row_nll` (the trainer passes one compiled with its shardings; its batches
  are already placed).  Otherwise, with `mesh`, host batches go through `global_batch` and the
  NLL runs sharded (`nll_step`); the result equals the unsharded one up to summation order."""
  if step_fn is None:
    step_fn = nll_step(cfg, mesh, rules)
    if mesh is not None:
      batches = (global_batch(b, mesh, rules) for b in batches)
  total, count = 0.0, 0.0
  for batch in batches:
    sums, counts = jax.device_get(step_fn(params, batch))
    total += float(np.sum(sums, dtype=np.float64))
    count += float(np.sum(counts, dtype=np.float64))
  return summarize(total, count)


def text_file_rows(path: str | pathlib.Path, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """A text file as rows predicting `seq_len` tokens each: [BOS] + tokens, cut every seq_len
  (without BOS for a tokenizer whose model expects none: its first token is not scored)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise EvaluationError(f"perplexity.source {str(path)!r} is neither a registered task nor "
                          f"a text file")
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise EvaluationError(f"{path}: not UTF-8 text (byte {e.start})") from None
  ids = vocabularies.bos_prefix(tokenizer) + tokenizer.encode(text)
  if len(ids) < 2:
    raise EvaluationError(f"{path}: no text to score")
  num_rows = -(-(len(ids) - 1) // seq_len)
  rows = packing.empty_rows(num_rows, seq_len)
  for r in range(num_rows):
    chunk = ids[r * seq_len:(r + 1) * seq_len + 1]
    n = len(chunk) - 1
    rows["tokens"][r, :n], rows["targets"][r, :n] = chunk[:-1], chunk[1:]
    rows["loss_mask"][r, :n] = 1.0
    rows["segment_ids"][r, :n] = 1
    rows["positions"][r, :n] = np.arange(n)
  return rows


@gin.configurable("perplexity")
@dataclasses.dataclass
class Perplexity:
  """Token NLL / perplexity of a registered task's split or of a local text file."""
  source: str = "synthetic_arithmetic"
  split: Optional[str] = None  # default: the task's validation split, else test
  seq_len: int = 512
  loss_on_inputs: bool = False  # targets only, as the trainer's eval_loss (True: prompts too)
  cache_dir: Optional[str] = None  # a task's cached rows (tools/cache_tasks.py)
  name: str = "perplexity"
  vocab: Optional[str] = None  # the model's vocabulary ('byte' or a SentencePiece file)

  def _split(self) -> str:
    if self.split:
      return self.split
    splits = catalog.splits_of(self.source)
    held_out = [s for s in ("validation", "test") if s in splits]
    if not held_out:
      raise EvaluationError(f"perplexity.source {self.source!r} has no validation or test split; "
                            f"set perplexity.split (its splits: {list(splits)})")
    return held_out[0]

  def settings(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "cache_dir")}

  def describe(self) -> str:
    """One line: which tokens of which data are scored."""
    if self.source not in catalog.TASKS and self.source not in catalog.MIXTURES:
      return (f"perplexity: NLL over every token of {self.source} after BOS, rows of "
              f"{self.seq_len} tokens")
    loss_on_inputs, seq_len = self.loss_on_inputs, self.seq_len
    if self.cache_dir:  # cached rows are scored as they were built
      index = caching.CachedRows(
          caching.cache_split_dir(self.cache_dir, self.source, self._split())).index
      loss_on_inputs, seq_len = index["loss_on_inputs"], index["seq_len"]
    return (f"perplexity: {scored_tokens(loss_on_inputs)} of {self.source} {self._split()}, "
            f"rows of {seq_len} tokens")

  def _rows(self) -> dict[str, np.ndarray]:
    vocab = self.vocab or vocabularies.BYTE_VOCAB_NAME
    if self.source in catalog.TASKS or self.source in catalog.MIXTURES:
      split = self._split()
      if self.cache_dir:
        rows = caching.CachedRows(caching.cache_split_dir(self.cache_dir, self.source, split))
      else:
        rows = pipeline.build_packed_rows(self.source, split, seq_len=self.seq_len,
                                          loss_on_inputs=self.loss_on_inputs, shuffle=False,
                                          vocab=vocab)
      return rows.rows(np.arange(rows.num_rows))
    return text_file_rows(self.source, vocabularies.get_tokenizer(vocab), self.seq_len)

  def examples(self) -> list[dict]:
    rows = self._rows()
    return [{"id": f"row-{i}", "row": {k: v[i] for k, v in rows.items()}}
            for i in range(len(rows["tokens"]))]

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    records = []
    for start in range(0, len(examples), model.batch_size):
      chunk = examples[start:start + model.batch_size]
      batch = {k: np.stack([e["row"][k] for e in chunk]) for k in chunk[0]["row"]}
      padded = -len(chunk) % model.batch_size  # one compiled shape
      if padded:
        empty = packing.empty_rows(padded, batch["tokens"].shape[1])
        batch = {k: np.concatenate([v, empty[k]]) for k, v in batch.items()}
      sums, counts = jax.device_get(nll_step(model.cfg, model.mesh, model.rules)(
          model.params, global_batch(batch, model.mesh, model.rules)))
      records += [{"id": e["id"], "nll_sum": float(s), "tokens": float(c)}
                  for e, s, c in zip(chunk, sums, counts)]
    return records

  def rescore(self, example: dict, record: dict) -> dict:
    """A resumed record: its loss tokens must be the row's, its NLL sum finite and >= 0."""
    return {"id": example["id"], "nll_sum": float(stored_count(record, "nll_sum")),
            "tokens": float(np.sum(example["row"]["loss_mask"]))}

  def metrics(self, records: list[dict]) -> dict[str, float]:
    out = summarize(sum(r["nll_sum"] for r in records), sum(r["tokens"] for r in records))
    return {**out, "num_rows": len(records)}
