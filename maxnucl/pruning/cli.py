"""Command lines of the pruning package (thin wrappers; tests call the library functions).

  maxnucl-prune    prune_main: checkpoint in, smaller checkpoint + report out (prune.py)
  maxnucl-analyze  analyze_main: entropy histograms, LP concentration, overlap (analysis.py)

`python tools/prune_checkpoint.py` and `python tools/analyze_ffn.py` are the same commands.
"""

import argparse
import inspect
import json
import logging
import sys

from maxnucl import distributed, outputs
from maxnucl.evaluation import core as evaluation_core
from maxnucl.pruning import analysis, prune
from maxnucl.pruning.scores import METHODS


def _parser(main) -> argparse.ArgumentParser:
  """The parser of a command: its docstring's first paragraph, then its usage notes."""
  summary, notes = inspect.cleandoc(main.__doc__).split("\n\n", 1)
  return argparse.ArgumentParser(description=summary, epilog=notes,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _key_value(text: str):
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--method_param {text!r}: expected key=value")
  key, value = text.split("=", 1)
  return key.strip(), value.strip()


def _input_vocab(checkpoint: str, vocab, announce: bool = True) -> str:
  """--vocab, else the input checkpoint's own (`generate.model_vocab`), printed with its source
  when `announce` (when some input is text to tokenize)."""
  from maxnucl import generate  # pylint: disable=import-outside-toplevel
  vocab, source = generate.model_vocab(checkpoint, vocab)
  if announce:
    print(f"vocabulary: {vocab} ({source})", file=sys.stderr)
  return vocab


def _tokenizes(*sources) -> bool:
  """Whether a data SOURCE is read through the vocabulary: a registered task name is, a
  .npy/.jsonl file of token ids is not."""
  return any(s is not None and not str(s).endswith((".npy", ".jsonl")) for s in sources)


def prune_main(argv=None) -> int:
  """Structured FFN neuron pruning: checkpoint in, physically smaller checkpoint (+ report) out.

    maxnucl-prune --input CKPT --output CKPT2 --method entropy --ratio 0.25 \\
        [--layers all|bottom_half|top_half|even|odd|0,3,5] [--budget per_layer|global] \\
        [--seed 0] [--report report.json] [--calibration SOURCE --calibration_examples 128] \\
        [--eval_perplexity SOURCE --eval_examples 128] [--data_cache_dir DIR] \\
        [--eval_task gsm8k --eval_task_limit 200 --eval_gin_param "gsm8k.num_shots = 5"] \\
        [--method_param key=value ...] [--overwrite] [--mesh_shape 1,-1,1] \\
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

  SOURCE: a .npy [N, L] / .jsonl token-id file or a registered task name, read from its cached
  shards with --data_cache_dir (docs/pruning.md).
  Every output path is checked before any work (an output that is, lies inside or contains the
  input is refused, symlinks resolved; --report's directory must exist); errors exit with 2.
  A full disk while writing exits with 1, one line naming the file; the report is written in
  one step, and a checkpoint the failed run created is removed again.
  SIGTERM, like Ctrl-C, removes the temporary output before exiting (status 143); one left by a
  killed run is removed by the next run.
  --mesh_shape data,fsdp,tensor (e.g. 1,-1,1): calibration and perplexity run with the model
  restored sharded over the devices, never whole on one host.  Several processes (one per host of
  a pod): every one runs this command with the multi-process flags (or none on a Cloud TPU VM);
  all take part in the sharded passes, process 0 writes the checkpoint and the report and prints.
  Methods: see --method above or maxnucl/pruning/scores.py.
  """
  parser = _parser(prune_main)
  parser.add_argument("--input", required=True,
                      help="input checkpoint, or a training workdir: its latest step (only read)")
  parser.add_argument("--output", required=True, help="output checkpoint directory")
  parser.add_argument("--method", required=True, help=f"one of {sorted(METHODS)}")
  parser.add_argument("--ratio", required=True, help="fraction of FFN neurons to remove, [0, 1)")
  parser.add_argument("--layers", default="all",
                      help="all|bottom_half|top_half|even|odd or a comma list of layer indices")
  parser.add_argument("--budget", default="per_layer", choices=prune.BUDGETS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--report", default=None, help="write the JSON report here")
  parser.add_argument("--calibration", default=None, help="calibration SOURCE (data-aware)")
  parser.add_argument("--calibration_examples", type=int, default=128)
  parser.add_argument("--eval_perplexity", default=None, help="held-out SOURCE for perplexity")
  parser.add_argument("--eval_examples", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128,
                      help="sequence length for data-source names and 1-D .npy streams")
  parser.add_argument("--data_cache_dir", default=None,
                      help="read a registered task's cached shards from here (calibration and "
                           "--eval_perplexity task names)")
  parser.add_argument("--vocab", default=None,
                      help="vocabulary for registered task names and text files: a "
                           "SentencePiece model (e.g. Gemma's tokenizer.model), a "
                           "tokenizer.json or 'byte' (default: the input's training run's "
                           "record, else the tokenizer the checkpoint carries, else 'byte')")
  parser.add_argument("--eval_task", action="append", default=[],
                      help="evaluate the input and the pruned checkpoint on this benchmark "
                           "(gsm8k, mbpp, superglue, perplexity; repeatable); metrics go to the "
                           "report (vocabulary: --vocab)")
  parser.add_argument("--eval_task_limit", type=int, default=None,
                      help="first N examples of each --eval_task (default: all)")
  parser.add_argument("--eval_gin_param", action="append", default=[],
                      help="gin binding for the --eval_task benchmarks, e.g. "
                           "\"gsm8k.num_shots = 0\" (repeatable; docs/evaluation.md)")
  parser.add_argument("--method_param", type=_key_value, action="append", default=[],
                      help="override a method parameter, e.g. neighbours=32 (repeatable)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  parser.add_argument("--mesh_shape", default=None, metavar="DATA,FSDP,TENSOR",
                      help="run calibration and perplexity on this device mesh with the model "
                           "sharded, e.g. 1,-1,1 (default: one device; several processes: "
                           "1,-1,1)")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  outputs.hide_failed_write_noise()
  outputs.exit_on_sigterm()  # like Ctrl-C: the temporary output is removed, then exit 143
  try:
    evaluation_core.check_limit(args.eval_task_limit, "--eval_task_limit")
    distributed.initialize_from_args(args)
    if args.eval_gin_param:
      import importlib  # pylint: disable=import-outside-toplevel
      from maxnucl import gin_config  # pylint: disable=import-outside-toplevel
      importlib.import_module("maxnucl.evaluate")  # registers the benchmarks' gin names
      gin_config.parse_files_and_bindings([], args.eval_gin_param, finalize_config=False)
      gin_config.check_types()
    args.vocab = _input_vocab(args.input, args.vocab, announce=bool(args.eval_task) or _tokenizes(
        args.calibration, args.eval_perplexity))
    with outputs.failed_writes_raised(args.output):
      report = prune.prune_ffn_neurons(
          args.input, args.output, method=args.method, ratio=args.ratio, layers=args.layers,
          budget=args.budget, seed=args.seed, method_params=dict(args.method_param),
          calibration=args.calibration, calibration_examples=args.calibration_examples,
          eval_perplexity=args.eval_perplexity, eval_examples=args.eval_examples,
          batch_size=args.batch_size, seq_len=args.seq_len, data_cache_dir=args.data_cache_dir,
          data_vocab=args.vocab, eval_tasks=args.eval_task,
          eval_task_limit=args.eval_task_limit, report_path=args.report,
          overwrite=args.overwrite, mesh_shape=args.mesh_shape)
  except outputs.WriteFailed as e:  # a failure while working (a full disk), not bad input
    print(f"{parser.prog}: error: {distributed.label()}{e}", file=sys.stderr)
    return 1
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    from maxnucl import gin_config  # pylint: disable=import-outside-toplevel
    print(f"{parser.prog}: error: {distributed.label()}{gin_config.error_message(e)}",
          file=sys.stderr)
    return 2
  if not distributed.is_primary():
    return 0
  summary = {k: report[k] for k in ("output", "method", "ratio", "budget", "num_removed",
                                    "ffn_widths_before", "ffn_widths_after")}
  if "perplexity" in report:
    summary["perplexity"] = {k: report["perplexity"][k]["perplexity"] for k in ("before", "after")}
  if "eval_tasks" in report:
    summary["eval_tasks"] = {name: {k: entry[k] for k in ("before", "after")}
                             for name, entry in report["eval_tasks"].items()}
  print(json.dumps(summary))
  return 0


def analyze_main(argv=None) -> int:
  """FFN analysis: outgoing-entropy histograms, LP-mass concentration, removal-set overlap.

    maxnucl-analyze --input CKPT --output_dir DIR \\
        [--methods entropy,magnitude,random,lp] [--ratio 0.25] [--layers all] [--seed 0] \\
        [--calibration SOURCE --calibration_examples 128] [--vocab tokenizer.model] \\
        [--data_cache_dir DIR]

  Writes DIR/analysis.json and DIR/{entropy_histograms,lp_concentration,overlap}.png.
  LP concentration (share of LP mass in the top 1% channels per layer) needs --calibration.
  """
  parser = _parser(analyze_main)
  parser.add_argument("--input", required=True,
                      help="checkpoint, or a training workdir: its latest step (only read)")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--methods", default="entropy,magnitude,random",
                      help="comma list of pruning methods to compare (empty: none)")
  parser.add_argument("--ratio", type=float, default=0.25)
  parser.add_argument("--layers", default="all")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--calibration", default=None)
  parser.add_argument("--calibration_examples", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--bins", type=int, default=50)
  parser.add_argument("--vocab", default=None,
                      help="tokenizer for a registered task name: a SentencePiece model (e.g. "
                           "Gemma's tokenizer.model), a tokenizer.json or 'byte' (default: as "
                           "maxnucl-prune's)")
  parser.add_argument("--data_cache_dir", default=None,
                      help="read a registered task's cached shards from here")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  outputs.hide_failed_write_noise()
  try:
    args.vocab = _input_vocab(args.input, args.vocab, announce=_tokenizes(args.calibration))
    with outputs.failed_writes_raised(args.output_dir):
      result = analysis.analyze_ffn(
          args.input, args.output_dir, methods=[m for m in args.methods.split(",") if m],
          ratio=args.ratio, layers=args.layers, seed=args.seed, calibration=args.calibration,
          calibration_examples=args.calibration_examples, batch_size=args.batch_size,
          seq_len=args.seq_len, bins=args.bins,
          data_cache_dir=args.data_cache_dir, data_vocab=args.vocab)
  except outputs.WriteFailed as e:  # a failure while working (a full disk), not bad input
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 1
  except (ValueError, FileNotFoundError) as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"output_dir": args.output_dir, "plots": result["plots"],
                    "lp_concentration": {k: v["share"] for k, v in
                                         result.get("lp_concentration", {}).items()},
                    "mean_jaccard": result.get("overlap", {}).get("mean")}))
  return 0
