"""`prune_ffn_neurons`: structured FFN neuron pruning that writes a physically smaller checkpoint.

Flow (one layer's FFN in memory at a time, see maxnucl.pruning.io):
  1. validate everything (ratio, method, layers, budget, every output path: the output is not
     the input, inside it or around it, symlinks resolved; it does not exist unless overwrite;
     the report's directory exists and is writable) before any work; then remove the temporary
     directories that killed runs left beside the output (maxnucl.outputs);
  2. data-aware methods: LayerStats from calibration batches (needs the whole model once; so does
     --eval_perplexity, before and after): in host memory on one device, or, with a mesh
     (`mesh_shape`, --mesh_shape 1,-1,1), restored sharded over the devices of every process
     (`checkpoints.load(path, mesh=, rules=)`), so no host ever holds the whole model;
  3. per_layer budget: floor(ratio * m_i) neurons of each selected layer; global budget:
     floor(ratio * sum_i m_i) neurons over all selected layers, ranked jointly (FLAP standardises
     its scores per layer first; compensating methods rank by their initial costs);
  4. the pruned widths are now known: open a streaming writer for the pruned config, copy the
     non-FFN tensors one at a time, then per layer read {U, V, W}, choose the removal set (score
     methods: top of the ranking; compensating methods: greedy with compensation), slice U/V
     columns and W rows and write them at once, in the input's stored dtype;
  5. the writer works in a temporary sibling directory renamed to the output at the end (the
     input is only read); the report JSON lists, per layer, the sorted kept original indices.
     It is written in one step (outputs.write_file_atomically); should it, or the perplexity or
     benchmarks after, fail, a checkpoint this run created is removed again.
A layer pruned to width 0 loses its FFN branch (and Gemma-2's FFN norms), which is exact because
the branch's output was the zero vector.

Several processes (maxnucl.distributed; a mesh over all their devices, (1, -1, 1) unless given)
all take part in the sharded calibration and perplexity passes; only process 0 scores, cuts and
writes the checkpoint and the report, the others wait for it (the output must then be visible to
every process for the "after" perplexity: a shared filesystem or bucket).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from maxnucl import checkpoints, distributed, ffn, models, outputs, paths, sharding
from maxnucl.pruning import calibration as calib
from maxnucl.pruning import io, surgery
from maxnucl.pruning.io import FFN_KEYS
from maxnucl.pruning.scores import LayerInputs, get_method

LAYER_GROUPS = ("all", "bottom_half", "top_half", "even", "odd")
BUDGETS = ("per_layer", "global")


class PruningError(ValueError):
  """Invalid pruning request (message names the argument and what was expected)."""


def select_layers(cfg, spec: str) -> list[int]:
  """Layer indices (with an FFN) selected by `spec`.

  all | bottom_half (i < L//2) | top_half (i >= L//2) | even | odd (0-based indices) |
  a comma list of indices, e.g. "0,3,5".  Note: with 0-based indices, Gemma-2's even layers use
  local (sliding-window) attention; the paper's "even layers (after global attention)" counts
  from 1 and corresponds to `odd` here.
  """
  widths = cfg.layer_ffn_widths
  n = cfg.num_layers
  spec = str(spec).strip()
  groups = {"all": range(n), "bottom_half": range(n // 2), "top_half": range(n // 2, n),
            "even": range(0, n, 2), "odd": range(1, n, 2)}
  if spec in groups:
    return [i for i in groups[spec] if widths[i] > 0]
  try:
    picked = sorted({int(tok) for tok in spec.split(",") if tok.strip()})
  except ValueError:
    raise PruningError(f"--layers {spec!r}: expected one of {LAYER_GROUPS} or a comma list of "
                       f"layer indices") from None
  if not picked:
    raise PruningError(f"--layers {spec!r} selects no layer")
  for i in picked:
    if not 0 <= i < n:
      raise PruningError(f"--layers {spec!r}: layer {i} does not exist (model has {n} layers)")
    if widths[i] == 0:
      raise PruningError(f"--layers {spec!r}: layer {i} has no FFN (width 0)")
  return picked


def _parse_method_params(method, overrides: Optional[dict]) -> dict:
  params = dict(method.defaults)
  for key, value in (overrides or {}).items():
    if key not in params:
      raise PruningError(f"method {method.name!r} has no parameter {key!r}; its parameters: "
                         f"{sorted(params) or 'none'}")
    params[key] = _parse_bool(method, key, value) if isinstance(params[key], bool) else \
        type(params[key])(value)
  return params


def _parse_bool(method, key: str, value) -> bool:
  """A boolean method parameter from Python (True/False) or the command line (true/false/1/0);
  bool("false") would be True."""
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text not in ("true", "false", "1", "0"):
    raise PruningError(f"method {method.name!r}: parameter {key}={value!r}, expected true or "
                       f"false (or 1 / 0)")
  return text in ("true", "1")


def _summary(values: np.ndarray) -> dict:
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  out: dict[str, Any] = {"count": int(values.size), "num_infinite": int(values.size - finite.size)}
  if finite.size:
    out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
               median=float(np.median(finite)))
  return out


class LayerPruner:
  """Per-layer scoring and cutting shared by prune_ffn_neurons and the analysis tools."""

  def __init__(self, reader: io.CheckpointReader, method: str, *, seed: int = 0,
               method_params: Optional[dict] = None,
               stats: Optional[dict[str, calib.LayerStats]] = None):
    self.reader = reader
    self.method = get_method(method)
    self.params = _parse_method_params(self.method, method_params)
    self.seed = seed
    self.stats = stats
    if self.method.needs_calibration and stats is None:
      raise PruningError(f"method {method!r} is data-aware and needs calibration data "
                         f"(--calibration SOURCE); none was given")

  def inputs(self, index: int, matrices: Optional[dict] = None) -> LayerInputs:
    """Layer `index`'s U, V, W (read from the checkpoint unless given) and its statistics."""
    name = ffn.layer_name(index)
    matrices = self.reader.read_ffn(name) if matrices is None else matrices
    return LayerInputs(index, name, matrices[ffn.GATE], matrices[ffn.UP], matrices[ffn.OUT],
                       None if self.stats is None else self.stats[name],
                       np.random.default_rng([self.seed, index]), self.params)

  def scores(self, layer: LayerInputs) -> np.ndarray:
    if self.method.compensating:
      return self.method.fn(layer, None).scores
    return self.method.fn(layer)

  def cut(self, layer: LayerInputs, num_remove: int, scores: Optional[np.ndarray] = None):
    """(removed indices in removal order, scores [m], W to slice from)."""
    if self.method.compensating:
      result = self.method.fn(layer, num_remove)
      return result.removed, result.scores, result.out
    scores = self.scores(layer) if scores is None else scores
    return surgery.top_removals(self.method.priority(scores), num_remove), scores, layer.out

  def global_counts(self, indices: list[int], ratio: float) -> tuple[dict[int, int], dict]:
    """Neurons to remove per layer under one budget floor(ratio * sum m_i) over `indices`."""
    priorities, cached = [], {}
    for i in indices:
      scores = self.scores(self.inputs(i))
      if not self.method.compensating:
        cached[i] = scores
      p = self.method.priority(scores)
      if self.method.standardize_for_global:
        finite = p[np.isfinite(p)]
        if finite.size:
          p = (p - finite.mean()) / (finite.std() + 1e-12)
      priorities.append(p)
    widths = [p.size for p in priorities]
    total = math.floor(ratio * sum(widths))
    flat = np.concatenate(priorities) if priorities else np.zeros(0)
    chosen = surgery.top_removals(flat, total)
    owner = np.repeat(np.arange(len(indices)), widths)
    counts = np.bincount(owner[chosen], minlength=len(indices))
    return {i: int(c) for i, c in zip(indices, counts)}, cached


def load_whole_model(reader: io.CheckpointReader, mesh=None, rules=None) -> dict:
  """The whole params tree, for the forward / backward passes of calibration and perplexity:
  host numpy arrays without a mesh; with one, every array restored straight into its sharding
  (`checkpoints.load`: each process reads only its devices' shards)."""
  if mesh is None:
    return reader.read_all()
  return checkpoints.load(reader.path, mesh=mesh, rules=rules)[1]


def _check_ratio(ratio) -> float:
  try:
    ratio = float(ratio)
  except (TypeError, ValueError):
    raise PruningError(f"--ratio {ratio!r}: expected a number in [0, 1)") from None
  if not 0.0 <= ratio < 1.0:
    raise PruningError(f"--ratio {ratio}: expected a fraction of neurons to remove in [0, 1)")
  return ratio


def prune_ffn_neurons(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                      method: str, ratio: float, layers: str = "all", budget: str = "per_layer",
                      seed: int = 0, method_params: Optional[dict] = None,
                      calibration: Any = None, calibration_examples: int = 128,
                      eval_perplexity: Any = None, eval_examples: int = 128,
                      batch_size: int = 8, seq_len: int = 128,
                      data_cache_dir: Optional[str | os.PathLike] = None,
                      data_vocab: str = "byte",
                      eval_tasks: Sequence[Any] = (), eval_task_limit: Optional[int] = None,
                      report_path: Optional[str | os.PathLike] = None,
                      overwrite: bool = False, mesh_shape: Any = None) -> dict:
  """Remove a fraction `ratio` of the FFN inner neurons and write a smaller checkpoint.

  Returns the report (also written to `report_path` as JSON when given).  `calibration` /
  `eval_perplexity`: a SOURCE as in maxnucl.pruning.calibration (`data_cache_dir`: where a
  registered task's cached shards are read from).  `eval_tasks`: benchmarks (names such as
  "gsm8k", configured by gin, or Benchmark objects; maxnucl.evaluate) run on the input and on the
  pruned checkpoint (the first `eval_task_limit` examples), their metrics put in the report under
  "eval_tasks".  `mesh_shape` (data, fsdp, tensor), e.g. (1, -1, 1) or "1,-1,1": calibration,
  perplexity and eval_tasks run on a device mesh with the model restored sharded (equal results
  up to summation order); default: one device (several processes: (1, -1, 1)).  Raises
  PruningError, outputs.OutputPathError (an output path that is, lies inside or contains an
  input, or a report path that cannot be written), FileExistsError or FileNotFoundError before
  reading or writing anything when a request is invalid.  With several processes, process 0
  writes the checkpoint and the report; the others return the settings, calibration and
  perplexity entries of the report only.
  """
  start = time.time()
  ratio = _check_ratio(ratio)
  method_obj = get_method(method) if method in _method_names() else None
  if method_obj is None:
    raise PruningError(f"unknown pruning method {method!r}; known methods: {_method_names()}")
  if budget not in BUDGETS:
    raise PruningError(f"--budget {budget!r}: expected one of {BUDGETS}")
  from maxnucl.evaluation import core  # pylint: disable=import-outside-toplevel
  core.check_limit(eval_task_limit, "--eval_task_limit")
  input_path = paths.as_path(input_path)  # a local path or a URL (gs://, file://)
  if not input_path.exists():
    raise FileNotFoundError(f"input checkpoint {input_path} does not exist")
  # Every output path is checked before any work: nothing is read, scored or written first.
  inputs = {"input checkpoint": input_path,
            **{f"{flag} file": source for flag, source in (("--calibration", calibration),
                                                           ("--eval_perplexity", eval_perplexity))
               if isinstance(source, (str, os.PathLike)) and os.path.lexists(source)}}
  output_path = outputs.check_output_path(output_path, inputs, overwrite=overwrite)
  if report_path is not None:
    report_path = outputs.check_output_file(
        report_path, {**inputs, "output checkpoint": output_path}, flag="--report")
  _parse_method_params(method_obj, method_params)
  if method_obj.needs_calibration and calibration is None:
    raise PruningError(f"method {method!r} is data-aware and needs calibration data "
                       f"(--calibration SOURCE); none was given")
  if eval_tasks and jax.process_count() > 1:
    raise PruningError("--eval_task is not run with several processes; evaluate the pruned "
                       "checkpoint afterwards with python -m maxnucl.evaluate (all processes)")
  mesh = sharding.mesh_for_flag(mesh_shape)
  rules = None if mesh is None else sharding.logical_axis_rules()
  primary = distributed.is_primary()
  distributed.sync("maxnucl-prune: request validated")  # before process 0 writes anything

  if primary:
    outputs.remove_stale_temporaries(output_path)  # of killed runs: free their space first
  reader = io.CheckpointReader(input_path)
  cfg = reader.cfg
  selected = select_layers(cfg, layers)
  source_kwargs = dict(batch_size=batch_size, seq_len=seq_len, pad_id=cfg.pad_id,
                       cache_dir=data_cache_dir, vocab=data_vocab, vocab_size=cfg.vocab_size)
  # Files are read and range-checked here, before the model is loaded (calibration.py).
  calibration_batches = eval_batches = None
  if method_obj.needs_calibration:
    calibration_batches = calib.iterate_batches(
        calibration, num_examples=calibration_examples, split="train", **source_kwargs)
  if eval_perplexity is not None:
    eval_batches = calib.iterate_batches(eval_perplexity, num_examples=eval_examples,
                                         split=calib.HELD_OUT, **source_kwargs)

  full_params = None
  stats = None
  report: dict[str, Any] = {
      "input": str(reader.path), "output": str(output_path), "method": method,
      "method_params": _parse_method_params(method_obj, method_params), "ratio": ratio,
      "layers_spec": layers, "selected_layers": selected, "budget": budget, "seed": seed}
  if mesh is not None:
    report["mesh_shape"] = dict(mesh.shape)
  if method_obj.needs_calibration or eval_perplexity is not None:
    full_params = load_whole_model(reader, mesh, rules)
  if method_obj.needs_calibration:
    rows = _RowCounter()
    stats = calib.collect_stats(cfg, full_params, rows.count(calibration_batches),
                                mesh=mesh, rules=rules)
    report["calibration"] = {"source": str(calibration), "examples": rows.rows,
                             "examples_requested": calibration_examples,
                             "tokens": next(iter(stats.values())).count}
  if eval_perplexity is not None:
    eval_rows = _RowCounter()
    before = calib.perplexity(cfg, full_params, eval_rows.count(eval_batches),
                              mesh=mesh, rules=rules)
  full_params = None
  created = primary and not paths.exists(output_path)
  if primary:  # the others wait: one process scores, cuts and writes
    report.update(_cut_and_write(reader, output_path, method=method, seed=seed,
                                 method_params=method_params, stats=stats, selected=selected,
                                 ratio=ratio, budget=budget, overwrite=overwrite))
  distributed.sync("maxnucl-prune: pruned checkpoint written")
  with _removed_on_failure(output_path, created):  # a failed run leaves no output to refuse
    if eval_perplexity is not None:
      after_reader = io.CheckpointReader(output_path)
      after = calib.perplexity(after_reader.cfg, load_whole_model(after_reader, mesh, rules),
                               calib.iterate_batches(eval_perplexity, num_examples=eval_examples,
                                                     split=calib.HELD_OUT, **source_kwargs),
                               mesh=mesh, rules=rules)
      report["perplexity"] = {"source": str(eval_perplexity), "examples": eval_rows.rows,
                              "examples_requested": eval_examples, "before": before,
                              "after": after}
    if eval_tasks:
      report["eval_tasks"] = _evaluate_tasks(eval_tasks, eval_task_limit, data_vocab,
                                             batch_size, io.CheckpointReader(input_path),
                                             io.CheckpointReader(output_path), mesh, rules)
    report["seconds"] = time.time() - start
    if report_path is not None and primary:
      outputs.write_file_atomically(report_path, json.dumps(report, indent=1))
  distributed.sync("maxnucl-prune: done")  # nobody exits while another process still works
  return report


@contextlib.contextmanager
def _removed_on_failure(output_path: paths.Path, created: bool):
  """Removes the pruned checkpoint that this run `created` when what follows its writing fails
  (the perplexity after, the benchmarks, the report on a full disk): a rerun would otherwise be
  refused because its output exists.  A checkpoint that replaced another (--overwrite) stays."""
  try:
    yield
  except BaseException:
    if created and paths.exists(output_path):
      paths.remove_tree(output_path)
    raise


def _cut_and_write(reader: io.CheckpointReader, output_path, *, method, seed, method_params,
                   stats, selected, ratio, budget, overwrite) -> dict:
  """Steps 3-5 of the module docstring: choose the removals, write the pruned checkpoint to
  `output_path`; returns the report's per-layer entries, widths and parameter counts."""
  cfg = reader.cfg
  widths = list(cfg.layer_ffn_widths)
  pruner = LayerPruner(reader, method, seed=seed, method_params=method_params, stats=stats)
  cached: dict[int, np.ndarray] = {}
  if budget == "global":
    counts, cached = pruner.global_counts(selected, ratio)
  else:
    counts = {i: math.floor(ratio * widths[i]) for i in selected}

  # The output widths are known before any layer is cut (every method removes exactly counts[i]),
  # so the writer can check each array against the pruned config as soon as it is produced.
  new_widths = [w - counts.get(i, 0) for i, w in enumerate(widths)]
  new_cfg = cfg if new_widths == widths else cfg.replace(ffn_widths=tuple(new_widths))
  layer_reports = []
  with io.CheckpointWriter(output_path, new_cfg, dtype=reader.dtype, overwrite=overwrite,
                           tokenizer_files=checkpoints.tokenizer_files(reader.path)) as writer:
    # Non-FFN arrays, opened lazily and copied block by block (the norms of an FFN branch cut to
    # width 0 are dropped).
    for key in reader.non_ffn_keys():
      if key in writer.expected:
        writer.write(key, reader.open_lazy(key))
    for i in range(cfg.num_layers):
      name = ffn.layer_name(i)
      entry: dict[str, Any] = {"name": name, "selected": i in counts, "width_before": widths[i]}
      layer_reports.append(entry)
      if i not in counts:  # unselected layers: copied unchanged, block by block
        entry.update(width_after=widths[i], num_removed=0, kept=list(range(widths[i])))
        for key in FFN_KEYS:
          if (name, "mlp", key) in writer.expected:
            writer.write((name, "mlp", key), reader.open_lazy((name, "mlp", key)))
        continue
      layer = pruner.inputs(i)
      removed, scores, out = pruner.cut(layer, counts[i], cached.pop(i, None))
      kept = np.setdiff1d(np.arange(widths[i]), removed)
      assert kept.size == new_widths[i], (name, kept.size, new_widths[i])
      if kept.size:
        pruned = surgery.slice_ffn(layer.ffn(out), kept)
        for key in FFN_KEYS:  # cast back to the stored dtype by the writer
          writer.write((name, "mlp", key), pruned.pop(key))
      removed_mask = np.zeros(widths[i], bool)
      removed_mask[removed] = True
      entry.update(width_after=int(kept.size), num_removed=int(removed.size), kept=kept.tolist(),
                   removed_order=[int(r) for r in removed],
                   scores={"all": _summary(scores), "removed": _summary(scores[removed_mask]),
                           "kept": _summary(scores[~removed_mask])})
      del layer, out

  return {"layers": layer_reports,
          "num_removed": int(sum(e["num_removed"] for e in layer_reports)),
          "ffn_widths_before": widths, "ffn_widths_after": new_widths,
          "param_count_before": models.param_count(cfg),
          "param_count_after": models.param_count(new_cfg)}


class _RowCounter:
  """Counts the rows with at least one loss token that pass through `count` (what a report
  says was used: a source may hold fewer rows than requested; padding rows do not count)."""

  def __init__(self):
    self.rows = 0

  def count(self, batches):
    for batch in batches:
      self.rows += int(np.sum(np.asarray(batch["loss_mask"]).sum(axis=1) > 0))
      yield batch


def _evaluate_tasks(eval_tasks, limit, vocab, batch_size, before: io.CheckpointReader,
                    after: io.CheckpointReader, mesh, rules) -> dict:
  """{name: {"before": metrics, "after": metrics, "examples": n}} of each benchmark, on one
  device or with the model sharded on `mesh`."""
  from maxnucl import evaluate  # pylint: disable=import-outside-toplevel
  from maxnucl.evaluation import core  # pylint: disable=import-outside-toplevel
  from maxnucl.generate import load_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = load_tokenizer(before.cfg, vocab)
  out = {}
  for task in eval_tasks:
    bench = evaluate.get_benchmark(task) if isinstance(task, str) else task
    if getattr(bench, "vocab", "unset") is None:
      bench.vocab = vocab
    entry: dict[str, Any] = {}
    for when, reader in (("before", before), ("after", after)):
      params = load_whole_model(reader, mesh, rules)
      model = core.LanguageModel(reader.cfg, params if mesh else jax.device_put(params),
                                 tokenizer, batch_size=batch_size, mesh=mesh, rules=rules)
      results = core.run_benchmark(bench, model, "", limit=limit, write_files=False)
      entry[when] = results["metrics"]
      entry["examples"] = results["num_examples"]
    entry["settings"] = bench.settings()
    out[bench.name] = entry
  return out


def _method_names() -> list[str]:
  from maxnucl.pruning.scores import METHODS  # pylint: disable=import-outside-toplevel
  return sorted(METHODS)
