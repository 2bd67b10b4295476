"""A tiny maxnucl Gemma-2 and a SentencePiece vocabulary trained here, for the tests of what
`maxnucl-to-hf` exports (the tokenizer, lm-eval's hf backend on the export)."""

import pathlib
import random

import jax

from maxnucl import checkpoints, models
from maxnucl.data import synthetic, vocabularies

PROSE = ("Outgoing connections of feed-forward neurons differ in entropy. Low-entropy neurons "
         "write to few coordinates of the residual stream; pruning removes the others first. "
         "Ada has 3 apples, gets 4 more and gives away 2: how many now? She has 5.")

# Text that tells tokenizers apart: spaces (leading, trailing, runs), newlines, tabs, characters
# outside the vocabulary (byte fallback), the special pieces' names as plain text, nothing.
TEXTS = ["Hello world", " leading space", "trailing space ", "two  spaces and\nnewline\n\n",
         "tab\there", "ünïcödé ✓ 日本語 € 🙂", "x = 12345 + 678;", "", " ", "   \n ",
         "<s> </s> <pad> <unk> <bos> <eos>", "ﬁ ligature, Ａ full width, ① circled",
         "\u3000ideographic space\u00a0no-break", "a\r\nb", PROSE]


def texts(seed: int = 0, count: int = 150) -> list[str]:
  """TEXTS, slices of the training text and random strings over an awkward alphabet."""
  rng = random.Random(seed)
  out = list(TEXTS)
  for _ in range(count):
    start = rng.randrange(len(PROSE))
    out.append(PROSE[start:start + rng.randrange(1, 80)])
  alphabet = " \n\t\u00a0ab1.,é€日🙂\u200b"
  out += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 16)))
          for _ in range(count)]
  return out


def corpus(directory: pathlib.Path) -> pathlib.Path:
  path = directory / "corpus.txt"
  problems = [synthetic.arithmetic_problem(0, "train", i) for i in range(200)]
  path.write_text("\n".join([PROSE] * 20 + [p["question"] + "\n" + p["answer"]
                                            for p in problems]))
  return path


def train_tiny_sentencepiece(directory: pathlib.Path) -> pathlib.Path:
  """A BPE model as maxnucl's trainer writes them (nmt_nfkc, dummy prefix, byte fallback;
  pad 0, eos 1, bos 2, unk 3) with at most 384 pieces: gemma2_tiny's vocabulary size."""
  model = vocabularies.train_sentencepiece([corpus(directory)], directory / "sp",
                                           vocab_size=384)
  assert vocabularies.get_tokenizer(str(model)).vocab_size <= 384
  return model


def save_tiny_checkpoint(path: pathlib.Path, seed: int = 0) -> models.ModelConfig:
  """gemma2_tiny (vocabulary 384, max_positions 512) at its initialisation, float32."""
  cfg = models.get_config("gemma2_tiny")
  checkpoints.save(path, cfg, models.init(cfg, jax.random.PRNGKey(seed)))
  return cfg
