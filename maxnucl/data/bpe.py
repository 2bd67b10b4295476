"""Byte-level BPE vocabularies (Llama-3, SmolLM2, Qwen2) as Hugging Face tokenizer files.

A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary as metadata
(`tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`, the special token ids, the chat
template). `tokenizer_files_from_gguf` rebuilds from it the two files a Hugging Face model
directory holds, `tokenizer.json` (built with the `tokenizers` library) and
`tokenizer_config.json`, so a converted checkpoint carries them in CKPT/tokenizer/ and
`maxnucl-to-hf` exports them unchanged.

The split before the merges (the pre-tokenizer) is named by `tokenizer.ggml.pre`; the regexes
are those of the models' own `tokenizer.json` files, as llama.cpp's `llama-vocab.cpp` lists them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

if TYPE_CHECKING:  # the reader type in annotations; gguf is imported where a file is read
  import gguf

# llama.cpp's token types (gguf.TokenType): which tokens are matched whole in the text.
_CONTROL = 3        # <|endoftext|>, <|im_start|>: special, dropped by decode(skip_special_tokens)
_USER_DEFINED = 4   # an added token that is not special (e.g. <think>)

# GPT-2's split, which `pre_tokenizers.ByteLevel(use_regex=True)` applies itself.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
  """SmolLM2's and StarCoder's: every digit alone, then GPT-2's split."""
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
  def build() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return build


# `tokenizer.ggml.pre` -> the pre-tokenizer of the model's own tokenizer.json.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_split,
    "gpt-2": _gpt2_split,
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "smaug-bpe": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_split(_QWEN2_SPLIT),
}

# `tokenizer.ggml.model` values this module builds a tokenizer for.
SUPPORTED_GGUF_TOKENIZERS = ("gpt2",)


class UnsupportedTokenizer(ValueError):
  """The GGUF's tokenizer is of a kind this module does not build (its weights still convert)."""


def tokenizer_files_from_gguf(reader: Union["gguf.GGUFReader", str, os.PathLike]
                              ) -> dict[str, bytes]:
  """{"tokenizer.json": ..., "tokenizer_config.json": ...} rebuilt from a GGUF's metadata.

  `reader` is a `gguf.GGUFReader` or the path of a .gguf file. Raises UnsupportedTokenizer (a
  ValueError) naming the field when the file's `tokenizer.ggml.model` or `.pre` is not one this
  module builds, and ValueError when a tokenizer field is missing or inconsistent.
  """
  metadata = gguf_tokenizer_metadata(reader)
  kind = metadata.get("tokenizer.ggml.model")
  if kind not in SUPPORTED_GGUF_TOKENIZERS:
    raise UnsupportedTokenizer(
        f"GGUF tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2': Llama-3, SmolLM2, "
        f"Qwen2) is rebuilt as tokenizer.json")
  tokenizer = byte_level_bpe(metadata)
  config = tokenizer_config(metadata)
  return {"tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
          "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n"
                                    ).encode("utf-8")}


def gguf_tokenizer_metadata(reader) -> dict[str, Any]:
  """The `tokenizer.*` fields and `{architecture}.context_length` of a GGUF, as Python values."""
  import gguf  # pylint: disable=import-outside-toplevel

  if not isinstance(reader, gguf.GGUFReader):
    reader = gguf.GGUFReader(os.fspath(reader))
  wanted = {name for name in reader.fields if name.startswith("tokenizer.")}
  architecture = reader.fields.get("general.architecture")
  if architecture is not None:
    wanted.add(f"{architecture.contents()}.context_length")
  return {name: reader.fields[name].contents() for name in wanted if name in reader.fields}


def byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
  """The `tokenizers.Tokenizer` of a byte-level BPE vocabulary given by GGUF metadata.

  Ids are the positions in `tokenizer.ggml.tokens` (already spelled in GPT-2's byte alphabet);
  control and user-defined tokens are matched whole as added tokens; BOS is not added by the
  post-processor unless `tokenizer.ggml.add_bos_token` says so (as the model's tokenizer.json).
  """
  tokens = _required(metadata, "tokenizer.ggml.tokens")
  merges = [tuple(merge.split(" ", 1)) for merge in _required(metadata, "tokenizer.ggml.merges")]
  pre = metadata.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise UnsupportedTokenizer(
        f"GGUF tokenizer.ggml.pre {pre!r}: no known pre-tokenizer (known: "
        f"{', '.join(sorted(PRE_TOKENIZERS))})")
  vocab = {token: index for index, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"GGUF tokenizer.ggml.tokens: {len(tokens) - len(vocab)} tokens repeat")
  tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tokenizer.decoder = decoders.ByteLevel()
  _add_whole_tokens(tokenizer, tokens, metadata.get("tokenizer.ggml.token_type") or ())
  tokenizer.post_processor = _bos_template(metadata, tokens)
  return tokenizer


def _add_whole_tokens(tokenizer: Tokenizer, tokens, token_types) -> None:
  """Control tokens as special added tokens, user-defined ones as plain added tokens."""
  special = [AddedToken(t, normalized=False, special=True)
             for t, kind in zip(tokens, token_types) if kind == _CONTROL]
  plain = [AddedToken(t, normalized=False, special=False)
           for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
  if special:
    tokenizer.add_special_tokens(special)
  if plain:
    tokenizer.add_tokens(plain)


def _bos_template(metadata: dict[str, Any], tokens) -> processors.TemplateProcessing:
  bos_id = metadata.get("tokenizer.ggml.bos_token_id")
  if not metadata.get("tokenizer.ggml.add_bos_token", False) or bos_id is None:
    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
  bos = tokens[bos_id]
  return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                       special_tokens=[(bos, bos_id)])


_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
  """tokenizer_config.json: special tokens by name, add_bos/eos_token, chat_template, length."""
  tokens = _required(metadata, "tokenizer.ggml.tokens")
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                            "clean_up_tokenization_spaces": False}
  for name, key in _SPECIAL_TOKEN_IDS.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= token_id < len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.{key} {token_id}: expected an id below the "
                         f"vocabulary size {len(tokens)}")
      config[name] = tokens[token_id]
  config["add_bos_token"] = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
  config["add_eos_token"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
  if "tokenizer.chat_template" in metadata:
    config["chat_template"] = metadata["tokenizer.chat_template"]
  lengths = [value for name, value in metadata.items() if name.endswith(".context_length")]
  if lengths:
    config["model_max_length"] = int(lengths[0])
  return config


def _required(metadata: dict[str, Any], name: str):
  if name not in metadata:
    raise ValueError(f"GGUF has no {name} field (needed to rebuild its tokenizer)")
  return metadata[name]
