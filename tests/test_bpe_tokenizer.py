"""Byte-level BPE vocabularies: tokenizer files rebuilt from GGUF metadata, checked on a tiny
vocabulary with known answers and, on the real SmolLM2-135M GGUF, against transformers' own
GGUF tokenizer."""

import json

import pytest
from tokenizers import Tokenizer

import bpe_cases
from maxnucl.data import bpe


def _rebuilt(path) -> Tokenizer:
  files = bpe.tokenizer_files_from_gguf(path)
  return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))


def test_gguf_vocabulary_encodes_with_its_merges(tmp_path):
  tokenizer = _rebuilt(bpe_cases.write_gguf(tmp_path / "tiny.gguf"))
  index = {token: i for i, token in enumerate(bpe_cases.tokens())}
  expected = [index[t] for t in ["hello", "Ġw", "o", "r", "l", "d", "Ġthe", "Ġ", "12"]]
  assert tokenizer.encode("hello world the 12", add_special_tokens=False).ids == expected


def test_gguf_control_tokens_are_matched_whole_and_skipped_by_decode(tmp_path):
  tokenizer = _rebuilt(bpe_cases.write_gguf(tmp_path / "tiny.gguf"))
  ids = tokenizer.encode("<|im_start|>hello<|im_end|>", add_special_tokens=False).ids
  hello = bpe_cases.tokens().index("hello")
  assert ids == [1, hello, 2]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"
  assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"


def test_gguf_pre_tokenizer_smollm_splits_digits(tmp_path):
  """'12' is a merge of the tiny vocabulary; SmolLM2's pre-tokenizer splits digits first."""
  default = _rebuilt(bpe_cases.write_gguf(tmp_path / "default.gguf"))
  smollm = _rebuilt(bpe_cases.write_gguf(tmp_path / "smollm.gguf", pre="smollm"))
  index = {token: i for i, token in enumerate(bpe_cases.tokens())}
  assert default.encode("12", add_special_tokens=False).ids == [index["12"]]
  assert smollm.encode("12", add_special_tokens=False).ids == [index["1"], index["2"]]


def test_gguf_add_bos_token_sets_the_post_processor_and_config(tmp_path):
  files = bpe.tokenizer_files_from_gguf(bpe_cases.write_gguf(tmp_path / "t.gguf", add_bos=True))
  tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
  config = json.loads(files["tokenizer_config.json"])
  assert tokenizer.encode("hello").ids[0] == 1
  assert tokenizer.encode("hello", add_special_tokens=False).ids[0] != 1
  assert config["add_bos_token"] is True


def test_gguf_tokenizer_config_names_special_tokens_and_template(tmp_path):
  files = bpe.tokenizer_files_from_gguf(bpe_cases.write_gguf(tmp_path / "t.gguf"))
  config = json.loads(files["tokenizer_config.json"])
  assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
  assert config["add_bos_token"] is False
  assert config["chat_template"] == bpe_cases.CHAT_TEMPLATE
  assert config["model_max_length"] == 256


def test_gguf_sentencepiece_tokenizer_is_refused_naming_the_kind(tmp_path):
  path = bpe_cases.write_gguf(tmp_path / "t.gguf", model="llama")
  with pytest.raises(bpe.UnsupportedTokenizer, match=r"tokenizer\.ggml\.model 'llama'.*'gpt2'"):
    bpe.tokenizer_files_from_gguf(path)


def test_gguf_unknown_pre_tokenizer_is_refused_naming_it(tmp_path):
  path = bpe_cases.write_gguf(tmp_path / "t.gguf", pre="mystery")
  with pytest.raises(bpe.UnsupportedTokenizer, match=r"tokenizer\.ggml\.pre 'mystery'"):
    bpe.tokenizer_files_from_gguf(path)


# --- The real SmolLM2-135M-Instruct GGUF against transformers' tokenizer of the same file. ---

SAMPLES = {
    "python": ('import os\n\n\ndef walk(top: str) -> list[str]:\n  """Files under top."""\n'
               '  return [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]  # 42\n'),
    "german": "Der Straßenbahnfahrer überquerte um 7:45 Uhr die Brücke.",
    "chinese": "我们今天下午去公园散步吧，天气很好。",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "french": "Où est la bibliothèque ? Ça coûte 12,50 € — déjà payé.",
    "emoji": "Party 🎉🚀 thumbs 👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "whitespace": "  two leading spaces\n\n\ttab 12345 x1y2   \n",
}


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf, tmp_path_factory):
  """(transformers' tokenizer of the GGUF, transformers loading our files, our tokenizers one)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  files = bpe.tokenizer_files_from_gguf(smollm2_gguf)
  directory = tmp_path_factory.mktemp("smollm2-tokenizer")
  for name, content in files.items():
    (directory / name).write_bytes(content)
  reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
  return reference, AutoTokenizer.from_pretrained(directory), Tokenizer.from_file(
      str(directory / "tokenizer.json"))


@pytest.mark.real_model
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_smollm2_gguf_ids_equal_transformers(smollm2_tokenizers, sample):
  reference, _, ours = smollm2_tokenizers
  text = SAMPLES[sample]
  ids = ours.encode(text, add_special_tokens=False).ids
  assert ids == reference(text)["input_ids"]
  assert ours.decode(ids) == text


@pytest.mark.real_model
def test_smollm2_gguf_chat_template_equals_transformers(smollm2_tokenizers):
  reference, exported, _ = smollm2_tokenizers
  conversation = [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]
  for add_generation_prompt in (False, True):
    text = reference.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    assert exported.apply_chat_template(conversation, tokenize=False,
                                        add_generation_prompt=add_generation_prompt) == text
    assert exported(text)["input_ids"] == reference(text)["input_ids"]
  assert ((exported.bos_token, exported.eos_token, exported.pad_token, exported.unk_token)
          == (reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token))
  assert exported.add_bos_token is False
