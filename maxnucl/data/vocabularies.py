"""Tokenizers for the TF-free pipeline, SentencePiece training, and matching seqio vocabularies.

All tokenizers follow Gemma's special ids: pad 0, eos 1, bos 2.

* Byte vocabulary (demos, tests, the synthetic task): ids identical to `seqio.ByteVocabulary`
  (pad 0, eos 1, unk 2, byte b -> b + 3; vocab_size 259).  BOS: we use id 2 (ByteVocabulary's
  unk, which never occurs in byte-encoded text) as the beginning-of-sequence token, so that BOS is
  2 as in Gemma.
* SentencePiece vocabulary (a model file such as Gemma's tokenizer.model): ids come from the
  model; `train_sentencepiece` writes models with pad 0, eos 1, bos 2, unk 3 like Gemma's.
* Hugging Face tokenizer (a `tokenizer.json`, e.g. the byte-level BPE of Llama-3, SmolLM2 and
  Qwen2, read with the `tokenizers` library): ids, special tokens, whether text starts with BOS
  (`add_bos_token`) and the chat template come from the file and the tokenizer_config.json beside
  it. SmolLM2 and Qwen2 put no BOS before text; Llama-3 does.

Every place that starts a text with BOS asks `bos_prefix(tokenizer)`: [bos_id] when the
tokenizer's `add_bos` says so (the byte and SentencePiece vocabularies: always), else nothing.

`get_tokenizer` (numpy / sentencepiece / tokenizers only) is what the TF-free pipeline uses;
`get_seqio_vocabulary` builds the equivalent `seqio.Vocabulary` (imports TensorFlow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
from typing import Iterable, Optional, Protocol, Sequence

import numpy as np

from maxnucl import outputs

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2

BYTE_VOCAB_NAME = "byte"
_BYTE_OFFSET = 3  # seqio.ByteVocabulary: pad, eos, unk come first
BYTE_VOCAB_SIZE = _BYTE_OFFSET + 256


class Tokenizer(Protocol):
  """What the pipeline needs from a vocabulary."""

  vocab_size: int
  pad_id: int
  eos_id: int
  bos_id: int
  add_bos: bool                  # text starts with bos_id (`bos_prefix`)
  chat_template: Optional[str]   # Jinja2, as transformers' apply_chat_template reads it

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS or EOS."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens (pad, eos, bos, control tokens) dropped."""
    ...


def bos_prefix(tokenizer: Tokenizer) -> list[int]:
  """What goes before a text's ids: [bos_id] if the tokenizer's model expects it, else []."""
  return [tokenizer.bos_id] if tokenizer.add_bos else []


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes offset by 3; ids identical to `seqio.ByteVocabulary()`; bos = 2 (its unk)."""

  vocab_size: int = BYTE_VOCAB_SIZE
  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  bos_id: int = BOS_ID
  add_bos: bool = True
  chat_template: Optional[str] = None

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
            + _BYTE_OFFSET).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= _BYTE_OFFSET) & (ids < BYTE_VOCAB_SIZE)]  # drop specials, like seqio
    return (ids - _BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="ignore")


class SentencePieceTokenizer:
  """A SentencePiece model file (e.g. Gemma's tokenizer.model) via the `sentencepiece` library."""

  add_bos = True
  chat_template = None

  def __init__(self, model_file: str | os.PathLike):
    import sentencepiece  # pylint: disable=import-outside-toplevel

    self.model_file = str(model_file)
    if not pathlib.Path(self.model_file).is_file():
      raise FileNotFoundError(f"SentencePiece model file not found: {self.model_file}")
    self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
    self.vocab_size = self._processor.get_piece_size()
    self.pad_id = self._processor.pad_id()
    self.eos_id = self._processor.eos_id()
    self.bos_id = self._processor.bos_id()
    for name in ("pad_id", "eos_id", "bos_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"SentencePiece model {self.model_file} defines no {name[:-3]} token "
                         f"(train it with pad_id=0, eos_id=1, bos_id=2 as Gemma's)")

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` via the `tokenizers` library (byte-level BPE: Llama-3,
  SmolLM2, Qwen2).  The special tokens, `add_bos_token` and `chat_template` are read from the
  tokenizer_config.json beside it (else special_tokens_map.json); without either, BOS is what
  the file's post-processor puts first (none: no BOS) and EOS a conventional end-of-text token."""

  def __init__(self, tokenizer_json: str | os.PathLike):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=import-outside-toplevel

    self.model_file = str(tokenizer_json)
    if not pathlib.Path(self.model_file).is_file():
      raise FileNotFoundError(f"tokenizer file not found: {self.model_file}")
    try:
      self._tokenizer = _Tokenizer.from_file(self.model_file)
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
      raise ValueError(f"{self.model_file}: not a Hugging Face tokenizer.json ({e})") from None
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    config = _tokenizer_config(pathlib.Path(self.model_file).parent)
    prepended = self._prepended_special_id()
    self.eos_id = self._special_id(config, "eos_token", _EOS_NAMES)
    self.bos_id = self._special_id(config, "bos_token", (), default=prepended)
    self.pad_id = self._special_id(config, "pad_token", (), default=self.eos_id)
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    add_bos = config.get("add_bos_token")
    self.add_bos = bool(add_bos) if add_bos is not None else prepended is not None
    self.chat_template = _template(config.get("chat_template"))
    # What a chat template reads as bos_token, eos_token, ... (strings, as transformers passes)
    self.special_tokens = {f"{role}_token": self._tokenizer.id_to_token(token_id)
                           for role, token_id in (("bos", self.bos_id), ("eos", self.eos_id),
                                                  ("pad", self.pad_id))}

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, token: str) -> Optional[int]:
    """The id of a token spelled as in the vocabulary (e.g. "<|im_end|>"), or None."""
    return self._tokenizer.token_to_id(token)

  def _prepended_special_id(self) -> Optional[int]:
    """The id the file's post-processor puts before a text (its BOS), or None."""
    plain = self._tokenizer.encode("a", add_special_tokens=False).ids
    full = self._tokenizer.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[-len(plain):] == plain else None

  def _special_id(self, config: dict, name: str, conventional: Sequence[str],
                  default: Optional[int] = None) -> Optional[int]:
    token = config.get(name)
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None:
      token_id = self._tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{self.model_file}: its {name} {token!r} (tokenizer_config.json) is not "
                         f"a token of the vocabulary")
      return token_id
    for candidate in conventional:
      if self._tokenizer.token_to_id(candidate) is not None:
        return self._tokenizer.token_to_id(candidate)
    if default is None and conventional:
      raise ValueError(f"{self.model_file}: no {name} (no tokenizer_config.json beside it names "
                       f"one, and none of {list(conventional)} is a token)")
    return default


# End-of-text tokens by convention (GPT-2 / SmolLM2, Llama-3, SentencePiece, Gemma).
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_config(directory: pathlib.Path) -> dict:
  """tokenizer_config.json of a Hugging Face tokenizer directory, special tokens completed from
  special_tokens_map.json; {} when neither exists."""
  config = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
    path = directory / name
    if path.is_file():
      try:
        config.update(json.loads(path.read_text(encoding="utf-8")))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
  return config


def _template(chat_template) -> Optional[str]:
  """The default template of tokenizer_config.json's chat_template (a string, or a list of
  {"name", "template"} in some files)."""
  if isinstance(chat_template, list):
    named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
    return named.get("default")
  return chat_template


def get_tokenizer(vocab: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; a `tokenizer.json` (or a directory holding one) ->
  HuggingFaceTokenizer; anything else is the path of a SentencePiece model file."""
  if vocab == BYTE_VOCAB_NAME:
    return ByteTokenizer()
  tokenizer_json = hf_tokenizer_json(vocab)
  if tokenizer_json is not None:
    return HuggingFaceTokenizer(tokenizer_json)
  return SentencePieceTokenizer(vocab)


def hf_tokenizer_json(vocab: str) -> Optional[pathlib.Path]:
  """The tokenizer.json `vocab` names (the file, or a directory holding one), else None."""
  path = pathlib.Path(vocab)
  if path.is_dir() and (path / "tokenizer.json").is_file():
    return path / "tokenizer.json"
  return path if path.suffix == ".json" else None


def get_seqio_vocabulary(vocab: str):
  """The seqio vocabulary with the same ids as `get_tokenizer(vocab)` (imports TensorFlow)."""
  from maxnucl.data import sources  # pylint: disable=import-outside-toplevel

  sources.hide_accelerators_from_tensorflow()
  import seqio  # pylint: disable=import-outside-toplevel

  if vocab == BYTE_VOCAB_NAME:
    return seqio.ByteVocabulary()
  if hf_tokenizer_json(vocab) is not None:
    from maxnucl.data import seqio_vocabulary  # pylint: disable=import-outside-toplevel
    return seqio_vocabulary.HuggingFaceVocabulary(get_tokenizer(vocab))
  return seqio.SentencePieceVocabulary(vocab)


def train_sentencepiece(text_files: Iterable[str | os.PathLike], model_prefix: str | os.PathLike,
                        *, vocab_size: int = 384, model_type: str = "bpe",
                        character_coverage: float = 1.0, byte_fallback: bool = True,
                        max_sentence_length: int = 16384) -> pathlib.Path:
  """Trains a SentencePiece model on local text files (one sentence/paragraph per line).

  Special ids match Gemma's tokenizer: pad 0, eos 1, bos 2, unk 3.  Returns the path of the
  written `<model_prefix>.model` (a `<model_prefix>.vocab` is written beside it).
  """
  import sentencepiece  # pylint: disable=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

  files = [str(f) for f in text_files]
  for f in files:
    if not pathlib.Path(f).is_file():
      raise FileNotFoundError(f"SentencePiece training text file not found: {f}")
  if not files:
    raise ValueError("train_sentencepiece needs at least one text file")
  reserved = 4 + (256 if byte_fallback else 0)  # pad, eos, bos, unk (and the byte pieces)
  if not isinstance(vocab_size, int) or vocab_size <= reserved:
    raise ValueError(f"vocab_size {vocab_size}: expected more than {reserved} (the special "
                     f"tokens{' and the 256 byte-fallback pieces' if byte_fallback else ''}) "
                     f"plus a piece for each character of the training text")
  model_prefix = pathlib.Path(model_prefix)
  texts = {"training text file" + (f" {i + 1}" if i else ""): f for i, f in enumerate(files)}
  if model_prefix.parent.is_dir():  # (a new directory holds no training text)
    for suffix in (".model", ".vocab"):  # never overwrite a training text, symlinks resolved
      outputs.check_output_file(f"{model_prefix}{suffix}", texts, flag="--output")
  # Trained in a temporary directory: a run that fails (or is refused by SentencePiece) leaves
  # nothing behind, not even the output's new parent directory.
  with tempfile.TemporaryDirectory(prefix="maxnucl-sentencepiece-") as tmp:
    trained = pathlib.Path(tmp) / "sp"
    try:
      sentencepiece.SentencePieceTrainer.train(
          input=",".join(files), model_prefix=str(trained), vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage,
          byte_fallback=byte_fallback, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=3,
          max_sentence_length=max_sentence_length, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as error:  # its checks of the options against the text
      raise ValueError(_sentencepiece_refusal(error, files, vocab_size)) from None
    # The model records the prefix it was trained under: the output's, as if trained in place.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(pathlib.Path(f"{trained}.model").read_bytes())
    proto.trainer_spec.model_prefix = str(model_prefix)
    contents = {".vocab": pathlib.Path(f"{trained}.vocab").read_bytes(),
                ".model": proto.SerializeToString()}
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix, content in contents.items():  # each appears by one rename, the model last
      outputs.write_atomically(f"{model_prefix}{suffix}", lambda f, c=content: f.write(c))
  return pathlib.Path(f"{model_prefix}.model")


def _sentencepiece_refusal(error: RuntimeError, files: Sequence[str], vocab_size: int) -> str:
  """SentencePiece's `INTERNAL: file.cc(N) [condition] reason` as a sentence about the input."""
  text = " ".join(str(error).split())
  needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", text)
  if needed:
    return (f"vocab_size {vocab_size} is too small for the training text: its characters and "
            f"the special tokens need at least {needed.group(1)} pieces")
  if "sentences_.empty()" in text:
    return f"the training text ({', '.join(files)}) holds no sentences"
  return f"SentencePiece cannot train on {', '.join(files)} with vocab_size {vocab_size}: {text}"
