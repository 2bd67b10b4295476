"""Evaluate a maxnucl checkpoint on GSM8K, MBPP, HumanEval, SuperGLUE or perplexity.

    python -m maxnucl.evaluate --gin_file=gin/eval/gsm8k.gin --checkpoint=DIR --output=OUT \\
        [--gin_param="gsm8k.num_shots = 8"] [--limit 50] [--vocab tokenizer.model]

Writes OUT/results.json (every metric, example counts, checkpoint, settings, the gin config,
elapsed time) and OUT/predictions.jsonl (one record per example: id, prompt, raw output,
extracted answer, reference, correct/score).  Rerunning the same command after an interruption
resumes: examples already in predictions.jsonl are skipped (a larger --limit adds to them).  An
OUT that holds an evaluation of other settings (benchmark settings, checkpoint, a smaller
--limit) is refused (exit 2, nothing changed) unless --overwrite is given, which evaluates afresh
and replaces OUT when done.  OUT may be a URL (gs://bucket/dir, file:///dir): the run is written
to a local temporary folder and its files copied to OUT when done, marked complete by
commit_success.txt; an existing OUT URL is refused without --overwrite (an interrupted run into a
URL is not resumed).  Protocols and metrics: docs/evaluation.md.

`--mesh_shape 1,-1,1` (or `evaluate.mesh_shape` in gin) restores the checkpoint straight into
its shardings on that (data, fsdp, tensor) mesh, for a model too large for one device.  Several
processes (one per host: `--coordinator_address --num_processes --process_id`, or nothing on a
Cloud TPU VM) evaluate together on a mesh over all their devices; process 0 alone writes the
files and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
import sys
from typing import Any, Optional, Sequence

import gin

from maxnucl import checkpoints, distributed, generate, gin_config, outputs, paths, sharding
from maxnucl.evaluation import core
from maxnucl.evaluation.gsm8k import GSM8K
from maxnucl.evaluation.humaneval import HumanEval
from maxnucl.evaluation.mbpp import MBPP
from maxnucl.evaluation.perplexity import Perplexity
from maxnucl.evaluation.superglue import SuperGLUE

# name -> benchmark class, each gin-configurable under the same name (`gsm8k.num_shots = 5`).
BENCHMARKS = {"gsm8k": GSM8K, "mbpp": MBPP, "humaneval": HumanEval, "superglue": SuperGLUE,
              "perplexity": Perplexity}


def get_benchmark(name: str) -> core.Benchmark:
  """A benchmark by name, configured by the gin bindings in force."""
  if name not in BENCHMARKS:
    raise core.EvaluationError(f"unknown evaluation task {name!r}; known: {sorted(BENCHMARKS)}")
  return BENCHMARKS[name]()


@gin.configurable("evaluate")
def evaluation_settings(benchmark: Any = gin.REQUIRED, vocab: Optional[str] = None,
                        batch_size: int = 16, dtype: Optional[str] = None,
                        limit: Optional[int] = None,
                        mesh_shape: Optional[Sequence[int]] = None) -> dict:
  """The gin bindings of a run: `evaluate.benchmark = @gsm8k()`, the model's vocabulary, batch
  size, dtype, an optional example limit, and an optional mesh (e.g. (1, -1, 1): fsdp over all
  devices, for a model that needs sharding to fit)."""
  if isinstance(benchmark, str):
    benchmark = get_benchmark(benchmark)
  core.check_limit(limit, "evaluate.limit =")
  return {"benchmark": benchmark, "vocab": vocab, "batch_size": batch_size, "dtype": dtype,
          "limit": limit, "mesh_shape": mesh_shape}


def evaluate_checkpoint(checkpoint: str, output: str | pathlib.Path, *,
                        benchmark: Optional[core.Benchmark] = None,
                        limit: Optional[int] = None, vocab: Optional[str] = None,
                        batch_size: Optional[int] = None, dtype: Optional[str] = None,
                        progress: bool = True, mesh_shape: Any = None,
                        overwrite: bool = False) -> dict:
  """Run the gin-configured (or given) benchmark on `checkpoint`; returns results.json's dict.
  Explicit arguments override the gin bindings.  `output` holding an evaluation of other
  settings (benchmark, its settings, checkpoint, a smaller limit) is refused before the model is
  loaded; with the same settings (or a larger limit) it is resumed.  The benchmark's data and
  the resumed records are validated (`core.prepare_run`) before the model is loaded.
  `overwrite`: evaluate afresh in a temporary folder that replaces `output` when done.  A URL
  `output` (`core.written_to`) is never resumed: an existing one is refused (FileExistsError)
  unless `overwrite`, which replaces it when the new run is published.  With
  several processes every one calls this; process 0 writes the files, and all return when it is
  done."""
  settings = evaluation_settings()
  benchmark = benchmark or settings["benchmark"]
  vocab, source = generate.model_vocab(checkpoint, vocab or settings["vocab"])
  limit = limit if limit is not None else settings["limit"]
  if getattr(benchmark, "vocab", "unset") is None:  # perplexity: tokenize with the model's
    benchmark.vocab = vocab
  mesh = sharding.mesh_for_flag(mesh_shape if mesh_shape is not None else settings["mesh_shape"])
  path = checkpoints.resolve(checkpoint)
  url = paths.is_url(output)
  # results go beside the checkpoint, never into it (symlinks resolved); a replaced output must
  # not contain it either; a URL is not resumed, so an existing one needs --overwrite; checked
  # before loading
  outputs.check_output_path(output, {"checkpoint": path}, overwrite=overwrite if url else None,
                            replaces=overwrite)
  # the data and what --output resumes, validated before anything is loaded or written
  prepared = core.prepare_run(benchmark, None if overwrite or url else output, limit=limit,
                              checkpoint=str(path))
  primary = distributed.is_primary()
  if primary:
    print(f"vocabulary: {vocab} ({source})", flush=True)
    if hasattr(benchmark, "describe"):
      print(benchmark.describe(), flush=True)
    if limit is not None and limit > prepared.available:
      print(f"limit {limit}: {benchmark.name} has {prepared.available} examples; evaluating all "
            f"{prepared.available}", flush=True)
  model = core.LanguageModel.load(str(path), vocab, dtype=dtype or settings["dtype"],
                                  batch_size=batch_size or settings["batch_size"], mesh=mesh)
  if url:
    destination = core.written_to(output, overwrite=overwrite)
  elif overwrite and primary and pathlib.Path(output).exists():
    destination = outputs.TemporaryOutput(output, overwrite=True)
  else:
    destination = contextlib.nullcontext(output)
  with destination as target:
    results = core.run_benchmark(benchmark, model, target, limit=limit, progress=progress,
                                 checkpoint=str(path), gin_config=gin.config_str(),
                                 prepared=prepared)
  distributed.sync("maxnucl-evaluate: done")  # nobody exits while another process still works
  return results


def _positive_int(text: str) -> int:
  """An argparse type: an integer >= 1 (--limit 0 evaluated nothing and wrote an empty result)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
  return value


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maxnucl.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin/eval/{gsm8k,mbpp,humaneval,superglue,perplexity}.gin "
                      "(repeatable)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. \"gsm8k.num_shots = 8\" (repeatable)")
  parser.add_argument("--checkpoint", required=True,
                      help="checkpoint directory, or a training workdir (its latest step)")
  parser.add_argument("--output", required=True, help="directory for results.json and "
                      "predictions.jsonl (an interrupted run in it is resumed), or a URL "
                      "(gs://bucket/dir, file:///dir; published when done, not resumed)")
  parser.add_argument("--limit", type=_positive_int, default=None,
                      help="evaluate the first N examples (N >= 1)")
  parser.add_argument("--vocab", default=None, help="'byte' or a SentencePiece model file "
                      "(default: evaluate.vocab in gin, else the vocabulary the checkpoint's "
                      "training run records, else 'byte')")
  parser.add_argument("--batch_size", type=_positive_int, default=None)
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--overwrite", action="store_true",
                      help="evaluate afresh and replace what --output holds when done (without "
                           "it, an --output of other settings is refused, the same resumed; an "
                           "existing URL --output is refused)")
  parser.add_argument("--mesh_shape", default=None, metavar="DATA,FSDP,TENSOR",
                      help="restore the model sharded on this device mesh, e.g. 1,-1,1 "
                           "(overrides evaluate.mesh_shape; default: one device)")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  if not args.gin_file:
    parser.error("give a --gin_file, e.g. gin/eval/gsm8k.gin")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  outputs.hide_failed_write_noise()
  try:
    distributed.initialize_from_args(args)
    gin_config.parse(args.gin_file, args.gin_param)
    with outputs.failed_writes_raised(args.output):
      results = evaluate_checkpoint(args.checkpoint, args.output, limit=args.limit,
                                    vocab=args.vocab, batch_size=args.batch_size,
                                    dtype=args.dtype, progress=not args.no_progress,
                                    mesh_shape=args.mesh_shape, overwrite=args.overwrite)
  except outputs.WriteFailed as e:  # a failure while working (a full disk), not bad input
    print(f"error: {distributed.label()}{e}", file=sys.stderr)
    return 1
  except (OSError, ValueError, KeyError, SyntaxError) as e:
    print(f"error: {distributed.label()}{gin_config.error_message(e)}", file=sys.stderr)
    return 2
  if not distributed.is_primary():
    return 0
  print(format_results(results))
  output = paths.as_path(args.output) if paths.is_url(args.output) else pathlib.Path(args.output)
  print(f"results:     {output / core.RESULTS}")
  print(f"predictions: {output / core.PREDICTIONS}")
  return 0


def format_results(results: dict) -> str:
  lines = [f"{results['benchmark']} on {results['checkpoint']} ({results['num_examples']} "
           f"examples, {results['elapsed_s']:.1f} s)"]
  for key, value in results["metrics"].items():
    lines.append(f"  {key:<28} {value:.4g}" if isinstance(value, float) else
                 f"  {key:<28} {value}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
