"""The reproduction's stages, each cached as `OUTPUT/stages/<stage>.json`.

    runner = Reproduction(output_dir, settings())   # settings: gin/reproduce/{full,quick}.gin
    runner.run(["finetune", "prune"])                # plus the stages they need, skipping done ones

Every training run is `python -m maxnucl.train` in a subprocess (the command a user runs) with a
generated gin file under `OUTPUT/runs/<name>/`; an interrupted run resumes from its checkpoints.
Pruning calls the pruner's library function (`prune_ffn_neurons`, the code behind
tools/prune_checkpoint.py); evaluation (held-out NLL, arithmetic accuracy, outgoing entropy) runs
in this process so one compiled function serves every model of a shape.  A stage's JSON is
written only when the stage is complete, a run's `evaluation.json` only when that run is
evaluated, so a rerun skips what is finished and redoes only the unfinished piece.

Stages (what each tests: docs/reproduction.md):
  data           corpus files -> splits, SentencePiece vocabulary, cached packed rows
  pretrain       a small Gemma-2 trained from scratch on the corpus, once per seed
  finetune       standard vs NUCL (ent, gini, mstd; alpha sweep) fine-tuning, seeds
  prune          every pruning method at `prune_ratios` on the standard fine-tuned models, and
                 the premise of entropy pruning: the rank correlation of each neuron's outgoing
                 entropy with its loss-proxy importance
  layer_subsets  entropy pruning of bottom/top half, even/odd layers
  nucl_prune     entropy pruning of the NUCL fine-tuned models vs the standard ones
  diversity      fine-tuning with the inter-neuron diversity term, and pruning it
  reallocation   FFN widths concentrated in the middle layers vs uniform, from scratch
  nucl_pretrain  NUCL during pre-training (from scratch) vs plain pre-training
  supernodes     LP mass of the top channels, and the cost of removing them vs random ones
  export         the best pruned model with per-layer widths, to Hugging Face, logits compared
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import numpy as np
import tqdm

from maxnucl import checkpoints, dependencies, ffn, losses, models, outputs, paths
from maxnucl.conversion import convert
from maxnucl.data import corpus, pipeline, vocabularies
from maxnucl.evaluation import core, gsm8k, perplexity
from maxnucl.models import ffn_allocation
from maxnucl.pruning import analysis, calibration, prune, scores
from maxnucl.reproduction import report

log = logging.getLogger(__name__)

STAGES = ("data", "pretrain", "finetune", "prune", "layer_subsets", "nucl_prune", "diversity",
          "reallocation", "nucl_pretrain", "supernodes", "export")
# What each stage reads from earlier ones (run first when missing).
REQUIRES = {"data": (), "pretrain": ("data",), "finetune": ("pretrain",),
            "prune": ("finetune",), "layer_subsets": ("finetune",),
            "nucl_prune": ("prune",), "diversity": ("prune",), "reallocation": ("data",),
            "nucl_pretrain": ("reallocation",), "supernodes": ("finetune",),
            "export": ("prune",)}
VARIANT_TERMS = {"ent": "nucl_ent", "gini": "nucl_gini", "mstd": "nucl_mstd"}
# What a stage imports beyond maxnucl's core, and why (maxnucl.dependencies names the extra).
IMPORTS = {"export": (("torch", "transformers"),
                      "loads the exported model with transformers to compare its logits")}
# The layout of an output directory: stored in settings.json, so that a directory written by an
# earlier layout (one pre-trained model shared by every seed) is refused rather than mixed in.
LAYOUT = 2


class ReproductionError(RuntimeError):
  pass


@gin.configurable("reproduce")
@dataclasses.dataclass(frozen=True)
class Settings:
  """The budget of a reproduction (gin/reproduce/full.gin, quick.gin)."""
  corpus_max_split_bytes: dict = dataclasses.field(default_factory=lambda: {
      "train": 4_000_000, "finetune": 600_000, "validation": 300_000, "test": 300_000})
  corpus_chunk_chars: int = 400
  corpus_max_file_bytes: int = 64_000
  vocab_size: int = 1024
  seq_len: int = 128
  batch_size: int = 8
  # The model: a Gemma-2 (local, global) stack; unset fields come from the gemma2_tiny preset.
  model: dict = dataclasses.field(default_factory=lambda: {
      "d_model": 192, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2, "head_dim": 48,
      "query_pre_attn_scalar": 48, "ffn_dim": 768, "sliding_window": 32, "max_positions": 256})
  seeds: tuple = (0, 1, 2)
  pretrain_steps: int = 1200
  pretrain_learning_rate: float = 3e-3
  finetune_steps: int = 200
  finetune_learning_rate: float = 1e-3
  curve_points: int = 4                  # checkpoints evaluated along each fine-tune
  # variant -> alphas; the first alpha is the one run with every seed, the others with seed 0
  nucl_alphas: dict = dataclasses.field(default_factory=lambda: {
      "ent": (3e-4, 1e-4, 1e-3), "gini": (2e-2, 5e-3, 1e-1), "mstd": (5e-2, 1.5e-2, 1.5e-1)})
  diversity_alpha: float = 1.0
  scratch_steps: int = 400               # reallocation and NUCL pre-training, from scratch
  scratch_nucl_alpha: float = 1e-3       # nucl_ent during pre-training
  middle_fraction: float = 0.7
  prune_methods: tuple = ("entropy", "random", "magnitude", "srinivas_babu", "stahlberg_byrne",
                          "wanda_channel", "flap", "lp", "scar_prot", "activation")
  prune_ratio: float = 0.25
  prune_sweep: tuple = (0.1, 0.25, 0.5)
  layer_subsets: tuple = ("all", "bottom_half", "top_half", "even", "odd")
  calibration_examples: int = 64
  eval_rows: int = 64                    # held-out corpus rows for the NLL
  arithmetic_examples: int = 64          # held-out arithmetic problems for accuracy
  arithmetic_max_new_tokens: int = 48
  supernode_fraction: float = 0.01
  supernode_random_draws: int = 3


@gin.configurable
def settings(value: Settings = Settings()) -> Settings:
  return value


def _stable_name(value: float) -> str:
  return f"{value:g}".replace("+", "")


def check_stages(stages: Sequence[str],
                 output_dir: Optional[str | os.PathLike] = None) -> None:
  """Refuse unknown stages, and stages whose optional imports are missing
  (`dependencies.MissingDependency`), before anything is written.  With `output_dir`, stages
  already finished there (and so skipped) need nothing; it may be a URL."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ReproductionError(f"unknown stages {unknown}; stages: {list(STAGES)}")
  done = paths.as_path(output_dir) / "stages" if output_dir is not None else None
  pending = [s for s in with_requirements(stages)
             if done is None or not (done / f"{s}.json").exists()]
  for stage in pending:
    if stage in IMPORTS:
      modules, purpose = IMPORTS[stage]
      dependencies.require(modules, f"the reproduction's {stage} stage ({purpose})")


def with_requirements(stages: Sequence[str]) -> list[str]:
  """`stages` and every stage they need, in running order."""
  needed = set()
  pending = list(stages)
  while pending:
    stage = pending.pop()
    if stage not in needed:
      needed.add(stage)
      pending.extend(REQUIRES[stage])
  return [s for s in STAGES if s in needed]


class Reproduction:
  """Runs stages into `output_dir`, skipping finished ones (see the module docstring).  A
  subclass (maxnucl.reproduction.real_model) brings its own stages, requirements and layout."""

  stage_names = STAGES
  requires = REQUIRES
  layout = LAYOUT
  # Called with a stage's name once its JSON is written (a URL output uploads it then).
  on_stage_done: Optional[Callable[[str], None]] = None

  def __init__(self, output_dir: str | os.PathLike, config: Settings, *,
               corpus_root: Optional[str | os.PathLike] = None, progress: bool = True):
    """`progress`: tqdm bars over the pruning grids (on stderr)."""
    self.out = pathlib.Path(output_dir).absolute()
    self.config = config
    self.corpus_root = pathlib.Path(corpus_root) if corpus_root else None
    if self.corpus_root is not None and not self.corpus_root.is_dir():
      raise corpus.CorpusError(f"--corpus {self.corpus_root}: not a directory")
    self.progress = progress
    self.out.mkdir(parents=True, exist_ok=True)
    (self.out / "stages").mkdir(exist_ok=True)
    self.results: dict[str, Any] = {}
    self._evaluator = None
    self._check_settings_unchanged()

  # ---- bookkeeping ------------------------------------------------------------------------------

  def settings_record(self) -> dict:
    """What settings.json holds: a rerun with anything else is refused."""
    record = json.loads(json.dumps(dataclasses.asdict(self.config)))
    record["corpus_root"] = str(self.corpus_root) if self.corpus_root else None
    record["layout"] = self.layout
    return record

  def _check_settings_unchanged(self) -> None:
    path = self.out / "settings.json"
    current = self.settings_record()
    if path.exists():
      saved = json.loads(path.read_text())
      if saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ReproductionError(
            f"{self.out} holds a reproduction with other settings (differing: {changed}); "
            f"use a new --output directory (cached stages would mix budgets)")
    else:
      _write_json(path, current)

  def stage_path(self, stage: str) -> pathlib.Path:
    return self.out / "stages" / f"{stage}.json"

  def result(self, stage: str) -> dict:
    if stage not in self.results:
      path = self.stage_path(stage)
      if path.exists():
        self.results[stage] = json.loads(path.read_text())
      else:
        for needed in self.requires[stage]:
          self.result(needed)
        log.info("stage %s: running", stage)
        start = time.perf_counter()
        value = getattr(self, f"stage_{stage}")()
        value["wall_time_s"] = time.perf_counter() - start
        _write_json(path, value)
        self.results[stage] = value
        log.info("stage %s: done in %.0f s", stage, value["wall_time_s"])
        if self.on_stage_done is not None:
          self.on_stage_done(stage)
    return self.results[stage]

  def run(self, stages: Optional[Sequence[str]] = None) -> dict:
    stages = self.stage_names if stages is None else stages
    if self.stage_names is STAGES:
      check_stages(stages, self.out)
    for stage in self.stage_names:  # in dependency order
      if stage in stages:
        self.result(stage)
    return {s: self.results[s] for s in self.stage_names if s in self.results}

  @property
  def corpus_dir(self) -> pathlib.Path:
    return self.out / "data" / "corpus"

  @property
  def vocab(self) -> str:
    return str(self.out / "data" / "vocab" / "sp.model")

  @property
  def cache_dir(self) -> pathlib.Path:
    return self.out / "data" / "cache"

  def _environment(self) -> None:
    os.environ["MAXNUCL_TEXT_CORPUS"] = str(self.corpus_dir)

  # ---- data -------------------------------------------------------------------------------------

  def stage_data(self) -> dict:
    root = self.corpus_root or corpus.python_stdlib_dir()
    data_dir = self.out / "data"
    if data_dir.exists():  # an interrupted earlier attempt: the stage is cheap, redo it whole
      shutil.rmtree(data_dir)
    suffixes = (".py",) if self.corpus_root is None else None
    manifest = corpus.prepare_corpus(
        root, self.corpus_dir, suffixes=suffixes,
        max_file_bytes=self.config.corpus_max_file_bytes,
        max_split_bytes=self.config.corpus_max_split_bytes,
        chunk_chars=self.config.corpus_chunk_chars)
    self._environment()
    text = data_dir / "vocab" / "train.txt"
    text.parent.mkdir(parents=True)
    with outputs.naming_errors(text), open(text, "w") as f:
      for piece in corpus.read_split("train"):
        f.write(piece if piece.endswith("\n") else piece + "\n")
    vocabularies.train_sentencepiece([text], data_dir / "vocab" / "sp",
                                     vocab_size=self.config.vocab_size)
    text.unlink()
    rows = {}
    for source, split in (("text_corpus", "train"), ("text_corpus", "validation"),
                          ("text_corpus", "test"), ("text_corpus_finetune_arithmetic", "train"),
                          ("text_corpus_finetune_arithmetic", "test"),
                          ("synthetic_arithmetic", "test")):
      index = pipeline.cache_task(source, split, self.cache_dir, seq_len=self.config.seq_len,
                                  vocab=self.vocab)
      rows[f"{source}/{split}"] = json.loads(pathlib.Path(index).read_text())["num_rows"]
    digest = hashlib.sha256("".join(f["sha256"] for f in manifest["files"]).encode()).hexdigest()
    return {"corpus_root": manifest["root"], "splits": manifest["splits"],
            "files": manifest["files"], "skipped": len(manifest["skipped"]),
            "files_sha256": digest, "vocab_size": self.config.vocab_size, "rows": rows,
            "tokens_per_row": self.config.seq_len}

  # ---- training ---------------------------------------------------------------------------------

  def _gin(self, *, source: str, eval_source: str, steps: int, learning_rate: float, seed: int,
           init_checkpoint: Optional[str], terms: Optional[dict],
           ffn_widths: Optional[Sequence[int]], checkpoint_every: int) -> str:
    model = dict(self.config.model)
    lines = [
        "include 'gin/base.gin'", "include 'gin/models/gemma2_tiny.gin'",
        "include 'gin/data/synthetic.gin'", "include 'gin/optimizers/adamw.gin'",
        "include 'gin/schedules/cosine.gin'", "include 'gin/sharding/single_device.gin'",
        "import maxnucl.data.corpus",
        f"MIXTURE_OR_TASK_NAME = {source!r}", f"EVAL_MIXTURE_OR_TASK_NAME = {eval_source!r}",
        f"DATA_SEQ_LEN = {self.config.seq_len}", f"DATA_BATCH_SIZE = {self.config.batch_size}",
        f"DATA_VOCAB = {self.vocab!r}", f"DATA_CACHE_DIR = {str(self.cache_dir)!r}",
        f"text_corpus_settings.directory = {str(self.corpus_dir)!r}",
        f"model_config.vocab_size = {self.config.vocab_size}",
        "model_config.dropout_rate = 0.0",
        "model_config.scan_layers = False  # tiny layers: unrolled is faster on CPU",
    ]
    lines += [f"model_config.{k} = {v!r}" for k, v in sorted(model.items())]
    if ffn_widths is not None:
      lines.append(f"model_config.ffn_widths = {list(ffn_widths)!r}")
    if terms:
      lines.append(f"total_loss.terms = {dict(terms)!r}")
      lines.append("nucl.target = 'ffn_out'")
    lines += [
        f"learning_rate_schedule.peak_learning_rate = {learning_rate!r}",
        f"learning_rate_schedule.warmup_steps = {max(1, min(50, steps // 10))}",
        f"train_loop.num_steps = {steps}", f"train_loop.seed = {seed}",
        f"train_loop.init_checkpoint = {init_checkpoint!r}",
        f"train_loop.log_every = {max(1, steps // 20)}", "train_loop.eval_every = 0",
        f"train_loop.checkpoint_every = {checkpoint_every}",
        "train_loop.keep_checkpoints = 1000", "train_loop.async_checkpointing = False",
        "train_loop.progress_bar = False  # the log is a file; the runner reports each run",
    ]
    return "\n".join(lines) + "\n"

  def train(self, name: str, *, source: str, steps: int, learning_rate: float, seed: int,
            init_checkpoint: Optional[str] = None, terms: Optional[dict] = None,
            ffn_widths: Optional[Sequence[int]] = None, eval_source: str = "text_corpus"
            ) -> pathlib.Path:
    """`python -m maxnucl.train` for run `name` (resumed if interrupted); its workdir."""
    points = max(1, self.config.curve_points)
    return self.run_training(name, self._gin(
        source=source, eval_source=eval_source, steps=steps, learning_rate=learning_rate,
        seed=seed, init_checkpoint=init_checkpoint, terms=terms, ffn_widths=ffn_widths,
        checkpoint_every=max(1, steps // points)))

  def run_training(self, name: str, gin_text: str) -> pathlib.Path:
    """`python -m maxnucl.train` with the settings `gin_text` (written to the run's run.gin) in
    OUTPUT/runs/`name` (resumed if interrupted); its workdir."""
    workdir = self.out / "runs" / name
    workdir.mkdir(parents=True, exist_ok=True)
    gin_file = workdir / "run.gin"
    outputs.write_file_atomically(gin_file, gin_text)
    env = dict(os.environ, MAXNUCL_TEXT_CORPUS=str(self.corpus_dir),
               JAX_COMPILATION_CACHE_DIR=str(self.out / ".jax_cache"))
    command = [sys.executable, "-m", "maxnucl.train", f"--gin_file={gin_file}",
               f"--workdir={workdir}"]
    log.info("run %s: %s", name, " ".join(command))
    start = time.perf_counter()
    with open(workdir / "train.log", "a") as stdout:
      done = subprocess.run(command, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            check=False)
    log.info("run %s: finished in %.0f s", name, time.perf_counter() - start)
    if done.returncode:
      tail = (workdir / "train.log").read_text().strip().splitlines()[-5:]
      raise ReproductionError(f"training run {name} failed (exit {done.returncode}); "
                              f"{workdir / 'train.log'} ends with:\n" + "\n".join(tail))
    return workdir

  # ---- evaluation -------------------------------------------------------------------------------

  @property
  def evaluator(self) -> "Evaluator":
    if self._evaluator is None:
      self._environment()
      self._evaluator = Evaluator(self.config, self.vocab, self.cache_dir)
    return self._evaluator

  def evaluate_run(self, workdir: pathlib.Path, *, accuracy: bool) -> dict:
    """Held-out NLL, per-layer outgoing entropy and (if `accuracy`) the arithmetic accuracy at
    every checkpoint of a run; cached in the run's evaluation.json."""
    cached = workdir / "evaluation.json"
    if cached.exists():
      return json.loads(cached.read_text())
    steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    curve = []
    for step in steps:
      cfg, params = checkpoints.load(workdir / "checkpoints" / str(step))
      point = {"step": step, **self.evaluator.quality(cfg, params)}
      if accuracy:
        point.update(self.evaluator.accuracy(cfg, params))
      curve.append(point)
    result = {"curve": curve, "final": dict(curve[-1])}
    result["train_metrics"] = _read_metrics(workdir / "metrics.jsonl")
    _write_json(cached, result)
    return result

  def train_and_evaluate(self, name: str, *, accuracy: bool = True, **train_kwargs) -> dict:
    workdir = self.out / "runs" / name
    if not (workdir / "evaluation.json").exists():
      workdir = self.train(name, **train_kwargs)
    return {"name": name, "workdir": str(workdir), **self.evaluate_run(workdir, accuracy=accuracy)}

  # ---- stages: training -------------------------------------------------------------------------

  def stage_pretrain(self) -> dict:
    """One pre-training per seed (its own initialisation and data order), so that the seeds of
    every later comparison are independent replicates of the whole pipeline."""
    c = self.config
    runs = {str(s): self.train_and_evaluate(
        f"pretrain_s{s}", source="text_corpus", steps=c.pretrain_steps,
        learning_rate=c.pretrain_learning_rate, seed=s, accuracy=False) for s in c.seeds}
    return {"runs": runs}

  def pretrained(self, seed: int) -> str:
    return str(checkpoints.resolve(self.out / "runs" / f"pretrain_s{seed}"))

  def _finetune(self, name: str, seed: int, terms: Optional[dict]) -> dict:
    c = self.config
    return self.train_and_evaluate(
        name, source="text_corpus_finetune_arithmetic", steps=c.finetune_steps,
        learning_rate=c.finetune_learning_rate, seed=seed, init_checkpoint=self.pretrained(seed),
        terms=terms)

  def stage_finetune(self) -> dict:
    runs = {"standard": {str(s): self._finetune(f"ft_standard_s{s}", s, None)
                         for s in self.config.seeds}}
    for variant, alphas in self.config.nucl_alphas.items():
      term = VARIANT_TERMS[variant]
      for position, alpha in enumerate(alphas):
        key = f"{variant}@{_stable_name(alpha)}"
        seeds = self.config.seeds if position == 0 else self.config.seeds[:1]
        runs[key] = {str(s): self._finetune(f"ft_{variant}_a{_stable_name(alpha)}_s{s}", s,
                                            {term: alpha}) for s in seeds}
    main = {v: f"{v}@{_stable_name(a[0])}" for v, a in self.config.nucl_alphas.items()}
    return {"runs": runs, "main": main}

  def finetuned(self, key: str) -> dict[str, str]:
    # the run's directory in this output, not the recorded path: a URL output's staging
    # directory may differ between runs
    return {seed: str(checkpoints.resolve(self.out / "runs" / run["name"]))
            for seed, run in self.result("finetune")["runs"][key].items()}

  # ---- stages: pruning --------------------------------------------------------------------------

  def prune_and_evaluate(self, base: str, base_key: str, *, method: str, ratio: float,
                         seed: int, layers: str = "all", budget: str = "per_layer",
                         accuracy: bool = False, keep: bool = False) -> dict:
    """The pruner on checkpoint `base`, then NLL (and accuracy) of the result; cached."""
    name = f"{base_key}/{method}_r{_stable_name(ratio)}_{layers}_{budget}_s{seed}"
    directory = self.out / "pruned" / name
    cached = directory / "evaluation.json"
    if cached.exists():
      return json.loads(cached.read_text())
    self._environment()
    output = directory / "checkpoint"
    prune_report = prune.prune_ffn_neurons(
        base, output, method=method, ratio=ratio, layers=layers, budget=budget, seed=seed,
        calibration="text_corpus", calibration_examples=self.config.calibration_examples,
        batch_size=self.config.batch_size, seq_len=self.config.seq_len,
        data_cache_dir=str(self.cache_dir), data_vocab=self.vocab, overwrite=True)
    cfg, params = checkpoints.load(output)
    result = {"method": method, "ratio": ratio, "layers": layers, "budget": budget,
              "seed": seed, "base": base, "ffn_widths": list(cfg.layer_ffn_widths),
              "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
              "prune_seconds": prune_report.get("seconds"), **self.evaluator.quality(cfg, params)}
    if accuracy:
      result.update(self.evaluator.accuracy(cfg, params))
    if not keep:
      shutil.rmtree(output)
    _write_json(cached, result)
    return result

  def _bar(self, jobs: list, description: str):
    return tqdm.tqdm(jobs, desc=description, disable=not self.progress, leave=False)

  def stage_prune(self) -> dict:
    c = self.config
    jobs = [(seed, base, method, ratio) for seed, base in self.finetuned("standard").items()
            for method in c.prune_methods for ratio in sorted(set(c.prune_sweep) | {c.prune_ratio})]
    rows = [self.prune_and_evaluate(base, f"standard_s{seed}", method=method, ratio=ratio,
                                    seed=int(seed), accuracy=ratio == c.prune_ratio)
            for seed, base, method, ratio in self._bar(jobs, "prune")]
    return {"rows": rows, "premise": self.premise(self.finetuned("standard"))}

  def premise(self, bases: dict[str, str]) -> dict[str, dict]:
    """Per seed: the Spearman rank correlation of each FFN neuron's outgoing entropy with its
    loss-proxy importance (LP, the calibration statistic of `lp` and SCAR), per layer and
    averaged.  Entropy pruning removes the highest-entropy neurons first, which can beat random
    removal only where entropy ranks importance: a correlation near 0 leaves the claim
    untestable on this model (maxnucl.reproduction.report.PREMISE_MIN_CORRELATION)."""
    c = self.config
    result = {}
    for seed, base in bases.items():
      cfg, params = checkpoints.load(checkpoints.resolve(base))
      batches = calibration.iterate_batches(
          "text_corpus", num_examples=c.calibration_examples, batch_size=c.batch_size,
          seq_len=c.seq_len, split="train", cache_dir=str(self.cache_dir), vocab=self.vocab)
      stats = calibration.collect_stats(cfg, params, batches)
      per_layer = {name: rank_correlation(ffn.row_entropy(params[name]["mlp"][ffn.OUT]),
                                          stats[name].loss_proxy) for name in stats}
      result[seed] = {"per_layer": per_layer, "mean": float(np.mean(list(per_layer.values())))}
    return result

  def stage_layer_subsets(self) -> dict:
    c = self.config
    jobs = [(seed, base, subset) for seed, base in self.finetuned("standard").items()
            for subset in c.layer_subsets]
    rows = [self.prune_and_evaluate(base, f"standard_s{seed}", method="entropy",
                                    ratio=c.prune_ratio, seed=int(seed), layers=subset)
            for seed, base, subset in self._bar(jobs, "layer subsets")]
    return {"rows": rows}

  def stage_nucl_prune(self) -> dict:
    c = self.config
    jobs = [(variant, seed, base, ratio)
            for variant, key in self.result("finetune")["main"].items()
            for seed, base in self.finetuned(key).items()
            for ratio in sorted(set(c.prune_sweep) | {c.prune_ratio})]
    rows = [{"variant": variant, **self.prune_and_evaluate(
        base, f"{variant}_s{seed}", method="entropy", ratio=ratio, seed=int(seed))}
            for variant, seed, base, ratio in self._bar(jobs, "prune NUCL models")]
    premise = {variant: self.premise(self.finetuned(key))
               for variant, key in self.result("finetune")["main"].items()}
    return {"rows": rows, "premise": premise}

  def stage_diversity(self) -> dict:
    c = self.config
    runs = {str(s): self._finetune(f"ft_diversity_a{_stable_name(c.diversity_alpha)}_s{s}", s,
                                   {"nucl_diversity": c.diversity_alpha}) for s in c.seeds}
    bases = {seed: str(checkpoints.resolve(run["workdir"])) for seed, run in runs.items()}
    rows = [self.prune_and_evaluate(base, f"diversity_s{seed}", method="entropy",
                                    ratio=c.prune_ratio, seed=int(seed))
            for seed, base in bases.items()]
    return {"runs": runs, "prune_rows": rows, "alpha": c.diversity_alpha,
            "premise": self.premise(bases)}

  # ---- stages: from scratch ---------------------------------------------------------------------

  def _scratch(self, name: str, seed: int, *, ffn_widths=None, terms=None) -> dict:
    c = self.config
    return self.train_and_evaluate(name, source="text_corpus", steps=c.scratch_steps,
                                   learning_rate=c.pretrain_learning_rate, seed=seed,
                                   ffn_widths=ffn_widths, terms=terms, accuracy=False)

  def stage_reallocation(self) -> dict:
    c = self.config
    layers, width = c.model["num_layers"], c.model["ffn_dim"]
    middle = ffn_allocation.allocate_ffn_widths(layers, width, scheme="middle",
                                     fraction=c.middle_fraction)
    runs = {"uniform": {str(s): self._scratch(f"scratch_uniform_s{s}", s) for s in c.seeds},
            "middle": {str(s): self._scratch(f"scratch_middle_s{s}", s, ffn_widths=middle)
                       for s in c.seeds}}
    return {"runs": runs, "widths": {"uniform": [width] * layers, "middle": list(middle)}}

  def stage_nucl_pretrain(self) -> dict:
    c = self.config
    alpha = c.scratch_nucl_alpha
    runs = {"standard": self.result("reallocation")["runs"]["uniform"],
            "nucl_ent": {str(s): self._scratch(f"scratch_nucl_ent_a{_stable_name(alpha)}_s{s}",
                                               s, terms={"nucl_ent": alpha})
                         for s in c.seeds}}
    return {"runs": runs, "alpha": alpha}

  # ---- stages: analysis and export --------------------------------------------------------------

  def stage_supernodes(self) -> dict:
    c = self.config
    rows = []
    for seed, base in self.finetuned("standard").items():
      cfg, params = checkpoints.load(checkpoints.resolve(base))
      batches = calibration.iterate_batches(
          "text_corpus", num_examples=c.calibration_examples, batch_size=c.batch_size,
          seq_len=c.seq_len, split="train", cache_dir=str(self.cache_dir), vocab=self.vocab)
      stats = calibration.collect_stats(cfg, params, batches)
      shares = analysis.lp_concentration(stats, c.supernode_fraction)
      supernodes = {name: _top(stats[name].loss_proxy, c.supernode_fraction) for name in stats}
      base = self.evaluator.quality(cfg, params)
      removed = self.evaluator.quality(cfg, _zero_channels(params, supernodes))
      rng = np.random.default_rng(1000 + int(seed))
      random_nll = []
      for _ in range(c.supernode_random_draws):
        picks = {name: rng.choice(stats[name].loss_proxy.size, size=idx.size, replace=False)
                 for name, idx in supernodes.items()}
        random_nll.append(self.evaluator.quality(cfg, _zero_channels(params, picks))["nll"])
      rows.append({"seed": int(seed), "lp_share": {k: v["share"] for k, v in shares.items()},
                   "num_supernodes": {k: v["num_supernodes"] for k, v in shares.items()},
                   "nll": base["nll"], "nll_rows": base["nll_rows"],
                   "nll_without_supernodes": removed["nll"],
                   "nll_without_supernodes_rows": removed["nll_rows"],
                   "nll_without_random": random_nll})
    return {"rows": rows, "fraction": c.supernode_fraction}

  def stage_export(self) -> dict:
    """The best method at the main ratio (lowest mean NLL) re-run with a global budget (per-layer
    widths), exported both ways and loaded by transformers."""
    c = self.config
    best = report.best_method(self.result("prune")["rows"], c.prune_ratio)
    base = self.finetuned("standard")[str(c.seeds[0])]
    pruned = self.prune_and_evaluate(base, f"standard_s{c.seeds[0]}", method=best,
                                     ratio=c.prune_ratio, seed=c.seeds[0], budget="global",
                                     keep=True)
    checkpoint = (self.out / "pruned" / f"standard_s{c.seeds[0]}" /
                  f"{best}_r{_stable_name(c.prune_ratio)}_all_global_s{c.seeds[0]}" /
                  "checkpoint")
    exports = {}
    for mode in ("pad", "custom_code"):
      target = self.out / "export" / mode
      exports[mode] = export_and_compare(checkpoint, target, mode, self.vocab)
    return {"method": best, "ffn_widths": pruned["ffn_widths"], "nll": pruned["nll"],
            "exports": exports}


# ---- evaluation ----------------------------------------------------------------------------------


class Evaluator:
  """Held-out corpus NLL, arithmetic NLL/accuracy and outgoing entropy of in-memory models."""

  def __init__(self, config: Settings, vocab: str, cache_dir: pathlib.Path):
    self.config = config
    self.tokenizer = vocabularies.get_tokenizer(vocab)

    def rows(source, split, limit):
      it = pipeline.create_data_iterator(split, source=source, batch_size=config.batch_size,
                                         seq_len=config.seq_len, vocab=vocab,
                                         cache_dir=str(cache_dir), repeat=False, shuffle=False,
                                         process_index=0, process_count=1)
      batches = []
      for batch in it:
        batches.append(batch)
        if len(batches) * config.batch_size >= limit:
          break
      return batches
    self.corpus = rows("text_corpus", "test", config.eval_rows)
    self.arithmetic = rows("synthetic_arithmetic", "test", config.eval_rows)

  def quality(self, cfg, params) -> dict:
    """Held-out corpus and arithmetic NLL (per token), each with its per-row NLL sums and token
    counts (`*_rows`: what the report's bootstrap intervals resample), and outgoing entropy."""
    entropy = np.asarray(jax.device_get(losses.outgoing_entropy(params, cfg)), np.float64)
    result = {"entropy_per_layer": entropy.tolist(), "entropy": float(entropy.sum())}
    for name, batches in (("nll", self.corpus), ("arithmetic_nll", self.arithmetic)):
      sums, tokens = self._row_nll(cfg, params, batches)
      result[name] = float(sums.sum() / tokens.sum())
      result[f"{name}_rows"] = {"sums": sums.tolist(), "tokens": tokens.tolist()}
    return result

  @staticmethod
  def _row_nll(cfg, params, batches) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and loss tokens of every held-out row that has any (padding rows dropped)."""
    step = perplexity.nll_step(cfg)
    sums, tokens = zip(*(jax.device_get(step(params, batch)) for batch in batches))
    sums, tokens = np.concatenate(sums).astype(np.float64), np.concatenate(tokens)
    return sums[tokens > 0], tokens[tokens > 0].astype(np.int64)

  def accuracy(self, cfg, params) -> dict:
    return arithmetic_accuracy(cfg, params, self.tokenizer, self.config.arithmetic_examples,
                               self.config.arithmetic_max_new_tokens)


def arithmetic_accuracy(cfg, params, tokenizer, examples: int, max_new_tokens: int) -> dict:
  """Zero-shot accuracy (strict, flexible) on the first `examples` held-out synthetic arithmetic
  problems, each asked as "Q: ...\nA: " and answered greedily."""
  benchmark = gsm8k.GSM8K(source="synthetic_arithmetic", num_shots=0,
                          question_template="Q: {question}\nA: ", max_new_tokens=max_new_tokens,
                          stop_strings=("Q:",))
  model = core.LanguageModel(cfg, params, tokenizer, batch_size=32)
  metrics = benchmark.metrics(benchmark.predict(model, benchmark.examples()[:examples]))
  return {k: metrics[k] for k in ("accuracy_strict", "accuracy_flexible")}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation of two equal-length vectors (Pearson's of their ranks, ties
  ranked by position: the scores compared here are continuous)."""
  ranks = [np.argsort(np.argsort(np.asarray(v, np.float64), kind="stable")) for v in (a, b)]
  return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _top(values: np.ndarray, fraction: float) -> np.ndarray:
  return np.asarray(scores.supernodes(values, fraction))


def _zero_channels(params: dict, channels: dict[str, np.ndarray]) -> dict:
  """A copy of `params` whose FFN inner channels `channels[layer]` are switched off (their
  gate/up columns and outgoing rows zeroed: the function of removing them)."""
  out = dict(params)
  for name, idx in channels.items():
    mlp = {k: np.array(v) for k, v in params[name]["mlp"].items()}
    mlp[ffn.OUT][idx, :] = 0
    for key in (ffn.GATE, ffn.UP):
      if key in mlp:
        mlp[key][:, idx] = 0
    out[name] = {**params[name], "mlp": mlp}
  return out


def export_and_compare(checkpoint: pathlib.Path, target: pathlib.Path, mode: str,
                       vocab: str) -> dict:
  """Export `checkpoint` to Hugging Face format (`mode`: pad | custom_code), load it with
  transformers and compare its logits with maxnucl's on held-out text."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  if target.exists():
    shutil.rmtree(target)
  convert.maxnucl_to_hf(checkpoint, target, ffn_widths_export=mode)
  cfg, params = checkpoints.load(checkpoint)
  tokenizer = vocabularies.get_tokenizer(vocab)
  text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"
  ids = np.asarray([vocabularies.bos_prefix(tokenizer) + tokenizer.encode(text)], np.int32)
  ours = np.asarray(models.apply(cfg, params, ids), np.float32)
  if mode == "pad":
    hf = transformers.Gemma2ForCausalLM.from_pretrained(target, dtype=torch.float32)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True,
                                                           dtype=torch.float32)
  hf.eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  size = sum(f.stat().st_size for f in target.rglob("*.safetensors"))
  return {"mode": mode, "path": str(target),
          "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
          "max_abs_logit": float(np.abs(ours).max()),
          "hf_parameters": int(sum(p.numel() for p in hf.parameters())),
          "safetensors_bytes": int(size), "tokens_compared": int(ids.size)}


def _read_metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  keep = ("step", "loss", "nll", "outgoing_entropy")
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a torn last line of a killed run
    records.append({k: record[k] for k in keep if k in record})
  return records


def _write_json(path: pathlib.Path, value: Any) -> None:
  outputs.write_file_atomically(path, json.dumps(value, indent=1, default=_jsonable))


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")
