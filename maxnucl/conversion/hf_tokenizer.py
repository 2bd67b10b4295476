"""A maxnucl vocabulary as Hugging Face tokenizer files, with the same ids as maxnucl's tokenizer.

    tokenizer_files(vocab, model_max_length=...) -> {file name: bytes}

`vocab` is what every maxnucl command takes (`maxnucl.data.vocabularies.get_tokenizer`): "byte",
a SentencePiece model file or a Hugging Face tokenizer.json.  A tokenizer.json is already in
Hugging Face's format: it is exported byte for byte with the files beside it
(tokenizer_config.json, special_tokens_map.json, tokenizer.model), e.g. a converted checkpoint's
CKPT/tokenizer/.  For the other two, the files, written into a Hugging Face model directory, make
`transformers.AutoTokenizer.from_pretrained(dir)` a tokenizer that encodes text to the ids that
maxnucl's tokenizer gives, with BOS (maxnucl's `bos_id`) put first as the trainer formats
examples (`add_bos_token`; `add_special_tokens=False` leaves it out), and the same pad, eos and
bos ids:

  tokenizer.json          the tokenizer in the `tokenizers` library's format (what
                          AutoTokenizer loads): normalizer, model, BOS template, decoder
  tokenizer_config.json   tokenizer class, special tokens, add_bos_token, model_max_length
  tokenizer.model         (SentencePiece only) the model file itself, byte for byte

SentencePiece (BPE models, as Gemma's and `train_sentencepiece`'s; others are refused): the
model's pieces become a `tokenizers` BPE model (merges ranked by the merged piece's score, the
order SentencePiece merges in), with byte fallback as the model has it, and SentencePiece's
normalization spelled out: the precompiled character map (e.g. nmt_nfkc), then, when the model
says so, leading and trailing spaces removed and runs of spaces collapsed
(remove_extra_whitespaces), a space put first (add_dummy_prefix), every space written as U+2581.
Control pieces (pad, eos, bos) are special tokens that text never produces, as in SentencePiece
(`split_special_tokens`); user-defined pieces are matched in the text as SentencePiece does.
Byte vocabulary: ids 0 pad, 1 eos, 2 bos, and byte b is token `<0xBB>` with id b + 3 (byte
fallback of an otherwise empty BPE model), as `vocabularies.ByteTokenizer`; decoding replaces an
invalid UTF-8 sequence with U+FFFD where maxnucl drops it.

Only the standard library and `sentencepiece` (its model protobuf) are needed to write them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from maxnucl import paths
from maxnucl.data import vocabularies

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
SPACE = "\u2581"  # SentencePiece's visible space

# SentencePiece ModelProto piece types and model types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
_BPE = 2


def tokenizer_files(vocab: str, *, model_max_length: int) -> dict[str, bytes]:
  """The Hugging Face tokenizer files of `vocab` ('byte' or a SentencePiece model file):
  file name -> content.  model_max_length: the model's longest sequence (max_positions)."""
  tokenizer_json = vocabularies.hf_tokenizer_json(vocab)
  if tokenizer_json is not None:
    return hf_files_beside(tokenizer_json)
  if vocab == vocabularies.BYTE_VOCAB_NAME:
    tokenizer, names = _byte_tokenizer()
    files = {}
  else:
    model_bytes = _read(vocab)
    tokenizer, names = _sentencepiece_tokenizer(vocab, _parse_model(vocab, model_bytes))
    files = {SENTENCEPIECE_MODEL: model_bytes}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **{f"{role}_token": name for role, name in names.items()},
      "add_bos_token": True, "add_eos_token": False,
      # Text never turns into a special token, as with maxnucl's tokenizers.
      "split_special_tokens": True,
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(model_max_length),
  }
  files[TOKENIZER_JSON] = _json_bytes(tokenizer)
  files[TOKENIZER_CONFIG] = _json_bytes(config)
  return files


def hf_tokenizer_files(hf_dir) -> dict[str, bytes]:
  """The tokenizer files of a Hugging Face model directory (tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, tokenizer.model; those present)."""
  names = (*vocabularies.HF_TOKENIZER_FILES, SENTENCEPIECE_MODEL)
  directory = paths.as_path(hf_dir)
  return {name: (directory / name).read_bytes() for name in names
          if (directory / name).is_file()}


def hf_files_beside(tokenizer_json) -> dict[str, bytes]:
  """A Hugging Face tokenizer's files: the tokenizer.json and those of its directory that
  transformers reads with it."""
  if not tokenizer_json.is_file():
    raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
  return hf_tokenizer_files(tokenizer_json.parent)


# ---- byte vocabulary -----------------------------------------------------------------------------

def _byte_tokenizer() -> tuple[dict[str, Any], dict[str, str]]:
  names = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>"}
  ids = {"pad": vocabularies.PAD_ID, "eos": vocabularies.EOS_ID, "bos": vocabularies.BOS_ID}
  specials = {names[role]: ids[role] for role in names}
  offset = vocabularies.BYTE_VOCAB_SIZE - 256
  pieces = {**specials, **{_byte_piece(b): b + offset for b in range(256)}}
  model = _bpe_model(pieces, [], unk=None)
  tokenizer = _tokenizer(
      model, added=[(i, name, True) for name, i in specials.items()], normalizer=None,
      pre_tokenizer=None, decoder=_sequence("decoders", [{"type": "ByteFallback"},
                                                         {"type": "Fuse"}]),
      bos=(names["bos"], ids["bos"]))
  return tokenizer, names


def _byte_piece(b: int) -> str:
  return f"<0x{b:02X}>"


# ---- SentencePiece -------------------------------------------------------------------------------

def _read(model_file: str) -> bytes:
  try:
    with open(model_file, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"SentencePiece model file not found: {model_file}") from None


def _parse_model(model_file: str, data: bytes):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel

  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(data)
  except DecodeError:
    proto.Clear()
  if not proto.pieces:
    raise ValueError(f"{model_file}: not a SentencePiece model (no pieces)")
  return proto


def _sentencepiece_tokenizer(model_file: str, proto) -> tuple[dict[str, Any], dict[str, str]]:
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
  names = {}
  for role in ("pad", "eos", "bos", "unk"):
    index = getattr(trainer, f"{role}_id")
    if 0 <= index < len(pieces):
      names[role] = pieces[index][0]
    elif role != "unk":
      raise ValueError(f"{model_file}: SentencePiece model defines no {role} token (train it "
                       f"with pad_id=0, eos_id=1, bos_id=2 as Gemma's)")
  added = [(i, piece, kind == _CONTROL) for i, (piece, _, kind) in enumerate(pieces)
           if kind in (_CONTROL, _USER_DEFINED)]
  if trainer.model_type != _BPE or trainer.treat_whitespace_as_suffix:
    # A unigram model's control pieces would be matched in text by `tokenizers`' Unigram model
    # (SentencePiece never matches them); word and char models are not written either.
    kind = _MODEL_TYPES.get(trainer.model_type, str(trainer.model_type))
    suffix = " with treat_whitespace_as_suffix" if trainer.model_type == _BPE else ""
    raise ValueError(f"{model_file}: a SentencePiece {kind} model{suffix}; only BPE models "
                     f"(Gemma's, train_sentencepiece's default) are written as a Hugging Face "
                     f"tokenizer")
  model = _bpe_model({piece: i for i, (piece, _, _) in enumerate(pieces)}, _bpe_merges(pieces),
                     unk=names.get("unk"), byte_fallback=trainer.byte_fallback)
  tokenizer = _tokenizer(
      model, added=added, normalizer=_normalizer(norm),
      pre_tokenizer=({"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never",
                      "split": True} if trainer.split_by_whitespace else None),
      decoder=_decoder(trainer, norm), bos=(names["bos"], trainer.bos_id))
  return tokenizer, names


def _normalizer(norm) -> dict:
  """SentencePiece's normalization (its NormalizerSpec `norm`) as `tokenizers` normalizers."""
  steps = []
  if norm.precompiled_charsmap:  # e.g. nmt_nfkc; empty for identity (Gemma's)
    steps.append({"type": "Precompiled", "precompiled_charsmap":
                  base64.b64encode(norm.precompiled_charsmap).decode("ascii")})
  if norm.remove_extra_whitespaces:
    steps.append(_replace({"Regex": "^ +| +$"}, ""))
    steps.append(_replace({"Regex": " {2,}"}, " "))
  if norm.add_dummy_prefix:  # (an empty text stays empty, as in SentencePiece)
    steps.append({"type": "Prepend", "prepend": SPACE})
  steps.append(_replace({"String": " "}, SPACE))
  return _sequence("normalizers", steps)


def _decoder(trainer, norm) -> dict:
  steps = [_replace({"String": SPACE}, " ")]
  if trainer.byte_fallback:
    steps.append({"type": "ByteFallback"})
  steps.append({"type": "Fuse"})
  if norm.add_dummy_prefix:  # SentencePiece drops the dummy prefix's space when decoding
    steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  return _sequence("decoders", steps)


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
  """Every pair (left, right) of pieces whose concatenation is a piece, ranked as SentencePiece
  merges: the merged piece's score, highest first (ties: lower id first)."""
  ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind in (_NORMAL, _UNKNOWN,
                                                                            _USER_DEFINED)}
  ranked = []
  for i, (piece, score, kind) in enumerate(pieces):
    if kind != _NORMAL:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in ids and right in ids:
        ranked.append((-score, i, ids[left], ids[right], left, right))
  return [[left, right] for *_, left, right in sorted(ranked)]


# ---- tokenizer.json pieces -----------------------------------------------------------------------

def _bpe_model(vocab: dict[str, int], merges: list, *, unk, byte_fallback: bool = True) -> dict:
  return {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
          "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback,
          "ignore_merges": False, "vocab": vocab, "merges": merges}


def _replace(pattern: dict, content: str) -> dict:
  return {"type": "Replace", "pattern": pattern, "content": content}


def _sequence(kind: str, steps: list) -> dict | None:
  if not steps:
    return None
  return {"type": "Sequence", kind: steps} if len(steps) > 1 else steps[0]


def _tokenizer(model: dict, *, added: list[tuple[int, str, bool]], normalizer, pre_tokenizer,
               decoder, bos: tuple[str, int]) -> dict[str, Any]:
  bos_name, bos_id = bos
  template = {"type": "TemplateProcessing",
              "single": [{"SpecialToken": {"id": bos_name, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [{"SpecialToken": {"id": bos_name, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": bos_name, "type_id": 1}},
                       {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {bos_name: {"id": bos_name, "ids": [bos_id],
                                            "tokens": [bos_name]}}}
  return {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": piece, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": special}
                           for i, piece, special in added],
          "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
          "post_processor": template, "decoder": decoder, "model": model}


def _json_bytes(value: Any) -> bytes:
  return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

