"""Tiny byte-level BPE vocabularies with known answers, as GGUF metadata and as tokenizer files.

The vocabulary: three control tokens, GPT-2's 256 byte characters (sorted), then the merged
tokens of MERGES in order. "hello world" encodes to ["hello", "Ġw", "o", "r", "l", "d"].
"""

from __future__ import annotations

import pathlib

from tokenizers import pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġ t", "Ġt he", "1 2"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokens() -> list[str]:
  merged = [merge.replace(" ", "") for merge in MERGES]
  return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged


def write_gguf(path: pathlib.Path, *, pre: str = "default", add_bos: bool = False,
               model: str = "gpt2", chat_template: str | None = CHAT_TEMPLATE,
               context_length: int = 256) -> pathlib.Path:
  """A GGUF file holding only the tiny vocabulary's tokenizer metadata (no tensors)."""
  import gguf  # pylint: disable=import-outside-toplevel

  vocab = tokens()
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_context_length(context_length)
  writer.add_tokenizer_model(model)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(vocab)
  writer.add_token_merges(MERGES)
  writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                         + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)))
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(add_bos)
  if chat_template is not None:
    writer.add_chat_template(chat_template)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def write_tokenizer_dir(directory: pathlib.Path, **gguf_options) -> pathlib.Path:
  """tokenizer.json + tokenizer_config.json of the tiny vocabulary in `directory` (via its GGUF
  metadata and `bpe.tokenizer_files_from_gguf`); returns the tokenizer.json path."""
  from maxnucl.data import bpe  # pylint: disable=import-outside-toplevel

  directory.mkdir(parents=True, exist_ok=True)
  gguf_file = write_gguf(directory / "tiny-tokenizer.gguf", **gguf_options)
  for name, content in bpe.tokenizer_files_from_gguf(gguf_file).items():
    (directory / name).write_bytes(content)
  gguf_file.unlink()
  return directory / "tokenizer.json"
