"""Generate text with a maxnucl checkpoint (KV-cache decoding, `maxnucl.decoding.generate`).

    python -m maxnucl.generate --checkpoint /tmp/maxnucl_demo --prompt $'Q: Ada has 3 apples ...\\nA: '
    python -m maxnucl.generate --checkpoint ckpt/gemma2_9b --vocab tokenizer.model \\
        --prompt "The capital of France is" --max_new_tokens 32 --temperature 0.7 --top_p 0.9

`--checkpoint` is a checkpoint directory or a training workdir (its latest step).  Each prompt is
encoded with `--vocab` (default: the byte vocabulary of the CPU demo; a SentencePiece model file
such as Gemma's tokenizer.model otherwise) after BOS, as the trainer formats examples.  The
continuation of each prompt is printed; generation stops at EOS unless --no_stop_at_eos.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

from maxnucl import checkpoints, decoding
from maxnucl.data import vocabularies


def load_model(checkpoint: str, *, dtype: Optional[str] = None, mesh=None, rules=None):
  """(cfg, params) of a checkpoint or of a training workdir's latest step; `dtype` sets both
  the stored and the compute dtype (e.g. "bfloat16")."""
  path = checkpoints.resolve(checkpoint)
  cfg, params = checkpoints.load(path, mesh=mesh, rules=rules, dtype=dtype)
  if dtype:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  return cfg, params


def model_vocab(checkpoint, vocab: Optional[str] = None) -> tuple[str, str]:
  """(vocabulary, where it comes from) for `checkpoint`: `vocab` if given; else the one the
  training run that wrote it records (a workdir's operative config), which must exist here; else
  the byte vocabulary (the CPU demo's).  A Gemma checkpoint trained here with its SentencePiece
  model is then read with that model, not silently with bytes."""
  if vocab:
    return vocab, "--vocab"
  recorded = checkpoints.training_vocab(checkpoint)
  if recorded is None:
    return vocabularies.BYTE_VOCAB_NAME, "the default (no --vocab, no training run's record)"
  vocab, record = recorded
  return vocab, f"recorded in {record}"


def load_tokenizer(cfg, vocab: str) -> vocabularies.Tokenizer:
  """The tokenizer for `vocab`, checked against the model's vocabulary size."""
  tokenizer = vocabularies.get_tokenizer(vocab)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise decoding.DecodingError(
        f"vocabulary {vocab!r} has {tokenizer.vocab_size} tokens but model {cfg.name!r} has "
        f"only {cfg.vocab_size} embeddings: wrong --vocab for this checkpoint?")
  return tokenizer


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maxnucl.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="checkpoint directory, or a training workdir (its latest step)")
  parser.add_argument("--vocab", default=None,
                      help="'byte' or a SentencePiece model file (default: the vocabulary the "
                           "checkpoint's training run records, else 'byte', the demo's)")
  parser.add_argument("--prompt", action="append", default=[],
                      help="prompt text (repeatable: the prompts are decoded as one batch)")
  parser.add_argument("--prompt_file", action="append", default=[],
                      help="a file whose whole content is one prompt (repeatable)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop", action="append", default=[],
                      help="stop string (repeatable): a row ends where it first appears, and "
                           "the printed text is cut before it")
  parser.add_argument("--no_stop_at_eos", action="store_true",
                      help="keep generating after EOS (default: a row ends at EOS)")
  parser.add_argument("--no_bos", action="store_true", help="do not put BOS before the prompt")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="cast params and compute to this dtype (default: as stored)")
  args = parser.parse_args(argv)
  try:
    for f in args.prompt_file:
      if not pathlib.Path(f).is_file():
        parser.error(f"--prompt_file {f}: no such file")
    prompts = list(args.prompt) + [pathlib.Path(f).read_text() for f in args.prompt_file]
    if not prompts:
      parser.error("give at least one --prompt or --prompt_file")
    cfg, params = load_model(args.checkpoint, dtype=args.dtype)
    vocab, source = model_vocab(args.checkpoint, args.vocab)
    print(f"vocabulary: {vocab} ({source})", file=sys.stderr)
    tokenizer = load_tokenizer(cfg, vocab)
    bos = [] if args.no_bos else [tokenizer.bos_id]
    encoded = [bos + tokenizer.encode(p) for p in prompts]
    outputs = decoding.generate(
        cfg, params, encoded, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        stop_token_ids=None if args.no_stop_at_eos else [tokenizer.eos_id],
        stop_strings=args.stop or None, tokenizer=tokenizer)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, tokens in enumerate(outputs):
    text = decoding.cut_at_stop(tokenizer.decode(tokens), args.stop)
    if len(outputs) > 1:
      print(f"--- prompt {i}")
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
