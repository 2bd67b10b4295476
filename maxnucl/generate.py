"""Generate text with a maxnucl checkpoint (KV-cache decoding, `maxnucl.decoding.generate`).

    python -m maxnucl.generate --checkpoint /tmp/maxnucl_demo --prompt $'Q: Ada has 3 apples ...\\nA: '
    python -m maxnucl.generate --checkpoint ckpt/gemma2_9b --vocab tokenizer.model \\
        --prompt "The capital of France is" --max_new_tokens 32 --temperature 0.7 --top_p 0.9

`--checkpoint` is a checkpoint directory or a training workdir (its latest step).  Each prompt is
encoded with `--vocab` (default: the vocabulary the training run records, else the tokenizer the
checkpoint carries, else the byte vocabulary of the CPU demo; otherwise a SentencePiece model
file such as Gemma's tokenizer.model or a Hugging Face tokenizer.json) after BOS when the
vocabulary's model expects one, as the trainer formats examples.  The continuation of each
prompt is printed; generation stops at EOS unless --no_stop_at_eos.

`--chat`: each prompt is a user message, put in the tokenizer's chat template (an instruct
model's tokenizer_config.json); the reply stops at the template's end of turn and only it is
printed:
    python -m maxnucl.generate --checkpoint ckpt/smollm2 --chat --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

from maxnucl import checkpoints, decoding
from maxnucl.data import chat_templates, vocabularies


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
  the tokenizer the checkpoint carries (CKPT/tokenizer/, written by the converters); else the
  byte vocabulary (the CPU demo's).  A Gemma checkpoint trained here with its SentencePiece
  model is then read with that model, not silently with bytes."""
  if vocab:
    return vocab, "--vocab"
  own = checkpoints.own_vocab(checkpoint)
  if own is None:
    return vocabularies.BYTE_VOCAB_NAME, ("the default (no --vocab, no training run's record, "
                                          "no tokenizer in the checkpoint)")
  return own


def open_tokenizer(vocab: str, flag: str = "--vocab") -> vocabularies.Tokenizer:
  """The tokenizer `vocab` names; a file that is no tokenizer is refused in one line naming it
  (sentencepiece itself raises a RuntimeError that names neither the flag nor the problem)."""
  try:
    return vocabularies.get_tokenizer(vocab)
  except RuntimeError as error:  # a ValueError (a bad tokenizer.json, ...) names the file itself
    reason = " ".join(str(error).split()) or type(error).__name__
    raise decoding.DecodingError(
        f"{flag} {vocab}: not a SentencePiece model, a Hugging Face tokenizer.json or "
        f"'{vocabularies.BYTE_VOCAB_NAME}' ({reason})") from None


def read_prompt_file(path: str) -> str:
  """The whole text of a prompt file; DecodingError naming the file and the line where it is not
  UTF-8."""
  data = pathlib.Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    raise decoding.DecodingError(f"--prompt_file {path}, line {line}: not UTF-8 text "
                                 f"({error.reason} at byte {error.start})") from None


def check_tokenizer(cfg, tokenizer: vocabularies.Tokenizer, vocab: str) -> vocabularies.Tokenizer:
  """`tokenizer`, refused when it has more ids than the model has embeddings."""
  if tokenizer.vocab_size > cfg.vocab_size:
    raise decoding.DecodingError(
        f"vocabulary {vocab!r} has {tokenizer.vocab_size} tokens but model {cfg.name!r} has "
        f"only {cfg.vocab_size} embeddings: wrong --vocab for this checkpoint?")
  return tokenizer


def load_tokenizer(cfg, vocab: str) -> vocabularies.Tokenizer:
  """The tokenizer for `vocab`, checked against the model's vocabulary size."""
  return check_tokenizer(cfg, open_tokenizer(vocab), vocab)


def encode_prompts(tokenizer: vocabularies.Tokenizer, prompts: Sequence[str], *,
                   chat: bool = False, bos: bool = True) -> tuple[list[list[int]], list[int]]:
  """(ids of each prompt, the ids that end a continuation).  Plain: BOS (if the vocabulary's
  model expects one and `bos`) + the prompt's ids, ended by EOS.  `chat`: each prompt is a user
  message in the chat template, ended by EOS or the template's end-of-turn token."""
  if chat:
    return ([chat_templates.chat_prompt_ids(tokenizer, p) for p in prompts],
            chat_templates.end_of_turn_ids(tokenizer))
  prefix = vocabularies.bos_prefix(tokenizer) if bos else []
  return [prefix + tokenizer.encode(p) for p in prompts], [tokenizer.eos_id]


def chat(cfg, params, tokenizer: vocabularies.Tokenizer, message: str, *,
         max_new_tokens: int = 256, **generate_options) -> str:
  """The assistant's reply to one user message (`decoding.generate` options: temperature,
  top_k, top_p, seed, ...), ended at the chat template's end of turn."""
  encoded, stop_ids = encode_prompts(tokenizer, [message], chat=True)
  (tokens,) = decoding.generate(cfg, params, encoded, max_new_tokens, stop_token_ids=stop_ids,
                                tokenizer=tokenizer, **generate_options)
  return tokenizer.decode(tokens).strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maxnucl.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="checkpoint directory, or a training workdir (its latest step)")
  parser.add_argument("--vocab", default=None,
                      help="'byte', a SentencePiece model file or a tokenizer.json (default: "
                           "the vocabulary the checkpoint's training run records, else the "
                           "tokenizer the checkpoint carries, else 'byte', the demo's)")
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
  parser.add_argument("--chat", action="store_true",
                      help="each prompt is a user message in the tokenizer's chat template; "
                           "print only the reply")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="cast params and compute to this dtype (default: as stored)")
  args = parser.parse_args(argv)
  try:
    for f in args.prompt_file:
      if not pathlib.Path(f).is_file():
        parser.error(f"--prompt_file {f}: no such file")
    prompts = list(args.prompt) + [read_prompt_file(f) for f in args.prompt_file]
    if not prompts:
      parser.error("give at least one --prompt or --prompt_file")
    vocab, source = model_vocab(args.checkpoint, args.vocab)
    print(f"vocabulary: {vocab} ({source})", file=sys.stderr)
    tokenizer = open_tokenizer(vocab)  # a file that is no tokenizer: before the model is loaded
    cfg, params = load_model(args.checkpoint, dtype=args.dtype)
    check_tokenizer(cfg, tokenizer, vocab)
    encoded, stop_ids = encode_prompts(tokenizer, prompts, chat=args.chat, bos=not args.no_bos)
    outputs = decoding.generate(
        cfg, params, encoded, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        stop_token_ids=None if args.no_stop_at_eos else stop_ids,
        stop_strings=args.stop or None, tokenizer=tokenizer)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, tokens in enumerate(outputs):
    text = decoding.cut_at_stop(tokenizer.decode(tokens), args.stop)
    text = text.strip() if args.chat else text
    if len(outputs) > 1:
      print(f"--- prompt {i}")
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
