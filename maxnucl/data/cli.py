"""Command lines of the data package (thin wrappers; tests call the library functions).

  python -m maxnucl.data cache --source gsm8k --split train --cache_dir /data/cache --seq_len 1024
  python -m maxnucl.data train_sentencepiece --output /tmp/sp --vocab_size 384 a.txt b.txt [--overwrite]
  python -m maxnucl.data list
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from maxnucl import gin_config, outputs


def _parse_feature_lengths(text: Optional[str]):
  if not text:
    return None
  try:
    lengths = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--feature_lengths {text!r}: not JSON ({e.msg}); expected e.g. "
                     f"'{{\"inputs\": 768, \"targets\": 256}}'") from None
  if not (isinstance(lengths, dict) and set(lengths) <= {"inputs", "targets"}
          and all(isinstance(v, int) and v > 0 for v in lengths.values())):
    raise ValueError(f"--feature_lengths {text!r}: expected positive integers for \"inputs\" "
                     f"and/or \"targets\"")
  return lengths


def cache_main(argv: Optional[Sequence[str]] = None) -> int:
  from maxnucl.data import pipeline  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description="Cache a task/mixture's packed rows as numpy "
                                   "shards for the TF-free pipeline.")
  parser.add_argument("--source", required=True, help="task or mixture name")
  parser.add_argument("--split", action="append",
                      help="split(s); default: every split of a task, 'train' of a mixture")
  parser.add_argument("--cache_dir", required=True)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--no_pack", action="store_true")
  parser.add_argument("--loss_on_inputs", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_shuffle", action="store_true")
  parser.add_argument("--vocab", default="byte", help="'byte' or a SentencePiece model file")
  parser.add_argument("--feature_lengths", help='JSON, e.g. {"inputs": 768, "targets": 256}')
  parser.add_argument("--mixture_size", type=int)
  parser.add_argument("--data_dir", help="root of the released dataset files "
                      "(default $MAXNUCL_DATA_DIR)")
  parser.add_argument("--use_seqio", action="store_true", help="read through seqio (needs TF)")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_binding", action="append", default=[])
  args = parser.parse_args(argv)
  from maxnucl.data import catalog  # pylint: disable=import-outside-toplevel
  bindings = list(args.gin_binding)
  if args.data_dir:
    bindings.append(f"data_roots.data_dir = {json.dumps(args.data_dir)}")
  gin_config.parse_files_and_bindings(args.gin_file, bindings, finalize_config=False)
  default_splits = (("train",) if args.source in catalog.MIXTURES
                    else catalog.splits_of(args.source))
  for split in args.split or default_splits:
    index = pipeline.cache_task(
        args.source, split, args.cache_dir, seq_len=args.seq_len, pack=not args.no_pack,
        loss_on_inputs=args.loss_on_inputs, seed=args.seed, shuffle=not args.no_shuffle,
        vocab=args.vocab, feature_lengths=_parse_feature_lengths(args.feature_lengths),
        mixture_size=args.mixture_size, use_seqio=args.use_seqio)
    meta = json.loads(index.read_text())
    print(f"{args.source}/{split}: {meta['num_examples']} examples -> {meta['num_rows']} rows "
          f"of {meta['seq_len']} tokens in {index.parent}")
  return 0


def train_sentencepiece_main(argv: Optional[Sequence[str]] = None) -> int:
  from maxnucl.data import vocabularies  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description="Train a SentencePiece model (pad 0, eos 1, "
                                   "bos 2, unk 3 as Gemma's) from local text files.")
  parser.add_argument("text_files", nargs="+")
  parser.add_argument("--output", required=True, help="model prefix; writes <output>.model")
  parser.add_argument("--vocab_size", type=int, default=384)
  parser.add_argument("--model_type", default="bpe", choices=("bpe", "unigram", "char", "word"))
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing <output>.model and <output>.vocab")
  args = parser.parse_args(argv)
  for suffix in (".model", ".vocab"):
    if os.path.lexists(f"{args.output}{suffix}") and not args.overwrite:
      raise FileExistsError(f"--output {args.output}: {args.output}{suffix} exists; pass "
                            f"--overwrite to replace it")
  path = vocabularies.train_sentencepiece(args.text_files, args.output,
                                          vocab_size=args.vocab_size, model_type=args.model_type)
  print(path)
  return 0


def list_main(argv: Optional[Sequence[str]] = None) -> int:
  del argv
  from maxnucl.data import catalog  # pylint: disable=import-outside-toplevel
  for name, task in catalog.TASKS.items():
    print(f"{name:32s} task     splits={','.join(task.splits)}  {task.description}")
  for name, mixture in catalog.MIXTURES.items():
    print(f"{name:32s} mixture  {dict(mixture.task_rates)}")
  return 0


COMMANDS = {"cache": cache_main, "train_sentencepiece": train_sentencepiece_main,
            "list": list_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exit codes (every maxnucl command line): 0 done, 2 bad usage or input (a one-line message
  naming it), 1 a failure while working."""
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = (f"usage: python -m maxnucl.data {{{','.join(COMMANDS)}}} ...  "
           f"(python -m maxnucl.data COMMAND --help for its options)")
  if argv[:1] in (["-h"], ["--help"]):
    print(usage + "\n\n" + __doc__.strip())
    return 0
  if not argv or argv[0] not in COMMANDS:
    print(usage, file=sys.stderr)
    return 2
  # TensorFlow / TFDS (probed for prepared datasets) log through absl and C++: keep the
  # command's own messages the only ones.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    with outputs.failed_writes_raised():
      return COMMANDS[argv[0]](argv[1:])
  except outputs.WriteFailed as e:  # a full disk: a failure while working, not bad input
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyError as e:  # an unknown task, split or field: KeyError's str() adds quotes
    print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
  except (ValueError, OSError) as e:  # bad values, missing or malformed dataset files
    print(f"error: {gin_config.error_message(e)}", file=sys.stderr)
  return 2
