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


# --- A tokenizer.json as a maxnucl vocabulary: pipeline, generate, chat, evaluate, conversion. ---

import numpy as np  # noqa: E402  (the sections above need neither)
import jax  # noqa: E402

from maxnucl import checkpoints, decoding, evaluate, generate, models  # noqa: E402
from maxnucl.data import chat_templates, packing, pipeline, vocabularies  # noqa: E402
from tolerances import decoder_terms, rounding_atol  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
  """The tiny vocabulary's tokenizer.json (no BOS before text, a ChatML template)."""
  return bpe_cases.write_tokenizer_dir(tmp_path_factory.mktemp("tiny-vocab"))


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, tiny_vocab):
  """llama_tiny (vocabulary 384 >= the tiny one's 267) carrying the tiny tokenizer, as a
  converter writes it (CKPT/tokenizer/)."""
  cfg = models.get_config("llama_tiny", num_layers=2, pad_id=0, eos_id=2, bos_id=1)
  params = jax.tree.map(lambda x: x * 2.0, models.init(cfg, jax.random.PRNGKey(7)))
  path = tmp_path_factory.mktemp("bpe-ckpt") / "ckpt"
  checkpoints.save(path, cfg, params)
  files = {f.name: f.read_bytes() for f in tiny_vocab.parent.iterdir()}
  checkpoints.write_tokenizer_files(path, files)
  return path, cfg, params


def test_tokenizer_json_vocabulary_reads_its_config(tiny_vocab, tmp_path):
  tokenizer = vocabularies.get_tokenizer(str(tiny_vocab))
  assert isinstance(vocabularies.get_tokenizer(str(tiny_vocab.parent)),
                    vocabularies.HuggingFaceTokenizer)  # the directory names it too
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (
      len(bpe_cases.tokens()), 0, 2, 1)
  assert tokenizer.add_bos is False and vocabularies.bos_prefix(tokenizer) == []
  assert tokenizer.chat_template == bpe_cases.CHAT_TEMPLATE
  index = {token: i for i, token in enumerate(bpe_cases.tokens())}
  assert tokenizer.encode("hello world") == [index[t] for t in ["hello", "Ġw", "o", "r", "l", "d"]]
  assert tokenizer.decode([1] + tokenizer.encode("hello world") + [2]) == "hello world"
  with_bos = vocabularies.get_tokenizer(str(bpe_cases.write_tokenizer_dir(tmp_path, add_bos=True)))
  assert with_bos.add_bos is True and vocabularies.bos_prefix(with_bos) == [1]


def test_byte_and_sentencepiece_vocabularies_keep_their_bos():
  assert vocabularies.bos_prefix(vocabularies.ByteTokenizer()) == [vocabularies.BOS_ID]
  assert vocabularies.SentencePieceTokenizer.add_bos is True


def test_seqio_vocabulary_encodes_as_the_tokenizer_inside_tf_data(tiny_vocab):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  tokenizer = vocabularies.get_tokenizer(str(tiny_vocab))
  vocabulary = vocabularies.get_seqio_vocabulary(str(tiny_vocab))
  texts = ["hello world", "the 12 <|im_end|>", "", "Grüße 🎉"]
  mapped = tf.data.Dataset.from_tensor_slices(texts).map(vocabulary.encode_tf)  # graph mode
  assert [ids.tolist() for ids in mapped.as_numpy_iterator()] == [tokenizer.encode(t)
                                                                  for t in texts]
  assert (vocabulary.eos_id, vocabulary.pad_id, vocabulary.vocab_size) == (2, 0, 267)
  first, second = tokenizer.encode("hello world") + [2, 5], tokenizer.encode("the")
  ids = tf.constant([first, second + [0] * (len(first) - len(second))])
  assert vocabulary.decode_tf(ids).numpy().tolist() == [b"hello world", b"the"]  # up to EOS
  assert vocabulary.decode(tokenizer.encode("Grüße 🎉")) == "Grüße 🎉"


def test_segment_without_bos_starts_with_the_inputs():
  tokens, targets, mask = packing.example_segment([10, 11], [12], seq_len=8, bos_id=None, eos_id=2)
  assert (tokens.tolist(), targets.tolist(), mask.tolist()) == ([10, 11, 12], [11, 12, 2],
                                                                [0.0, 1.0, 1.0])
  # seq_len tokens: without BOS the sequence holds one element more of the inputs
  tokens, _, _ = packing.example_segment([5, 6, 7, 8], [9], seq_len=3, bos_id=None, eos_id=2)
  assert tokens.tolist() == [7, 8, 9]


@pytest.mark.parametrize("use_seqio", [False, True])
def test_data_pipeline_tokenizes_with_a_tokenizer_json(tiny_vocab, use_seqio):
  rows = pipeline.build_packed_rows("synthetic_arithmetic", "test", seq_len=512, shuffle=False,
                                    pack=False, vocab=str(tiny_vocab), use_seqio=use_seqio)
  tokenizer = vocabularies.get_tokenizer(str(tiny_vocab))
  example = pipeline.catalog.text_examples("synthetic_arithmetic", "test", seed=0,
                                           shuffle=False)[0]
  sequence = (tokenizer.encode(example["inputs"]) + tokenizer.encode(example["targets"])
              + [tokenizer.eos_id])  # no BOS: this vocabulary's model expects none
  row = rows.rows(np.arange(1))
  n = len(sequence) - 1
  assert n < 512  # the whole example, untruncated
  assert row["tokens"][0, :n].tolist() == sequence[:-1]
  assert row["targets"][0, :n].tolist() == sequence[1:]
  assert rows.index["vocab_size"] == 267 and rows.index["eos_id"] == 2


def test_generate_reads_the_tokenizer_the_checkpoint_carries(bpe_checkpoint, capsys):
  path, cfg, params = bpe_checkpoint
  assert generate.main(["--checkpoint", str(path), "--prompt", "hello world",
                        "--max_new_tokens", "8"]) == 0
  out, err = capsys.readouterr()
  carried = checkpoints.checkpoint_vocab(path)
  assert f"vocabulary: {carried} (carried by the checkpoint)" in err
  tokenizer = vocabularies.get_tokenizer(carried)
  tokens = decoding.generate(cfg, params, [tokenizer.encode("hello world")], 8,
                             stop_token_ids=[tokenizer.eos_id])[0]
  assert out == tokenizer.decode(tokens) + "\n"


def test_generate_chat_applies_the_template_and_prints_the_reply(bpe_checkpoint, capsys):
  path, cfg, params = bpe_checkpoint
  tokenizer = vocabularies.get_tokenizer(checkpoints.checkpoint_vocab(path))
  rendered = chat_templates.render_chat(tokenizer, [{"role": "user", "content": "hi"}])
  assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  prompt_ids = chat_templates.chat_prompt_ids(tokenizer, "hi")
  assert prompt_ids[0] == 1 and prompt_ids.count(2) == 1  # <|im_start|>, <|im_end|> whole
  # the reply stops at <|im_end|> (2) or <|endoftext|> (0)
  assert chat_templates.end_of_turn_ids(tokenizer) == [2, 0]
  tokens = decoding.generate(cfg, params, [prompt_ids], 10, stop_token_ids=[2, 0])[0]
  reply = generate.chat(cfg, params, tokenizer, "hi", max_new_tokens=10)
  assert reply == tokenizer.decode(tokens).strip()
  assert generate.main(["--checkpoint", str(path), "--chat", "--prompt", "hi",
                        "--max_new_tokens", "10"]) == 0
  assert capsys.readouterr().out == reply + "\n"


def test_generate_chat_is_refused_without_a_chat_template(bpe_checkpoint, capsys):
  path, _, _ = bpe_checkpoint
  assert generate.main(["--checkpoint", str(path), "--vocab", "byte", "--chat", "--prompt",
                        "hi"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == ("error: vocabulary the byte vocabulary has no chat template (expected a "
                 "tokenizer.json whose tokenizer_config.json has chat_template)")


def test_evaluate_perplexity_uses_the_carried_tokenizer(bpe_checkpoint, tmp_path):
  """Every token after the first is scored (no BOS before the text for this vocabulary)."""
  import gin  # pylint: disable=import-outside-toplevel

  path, cfg, params = bpe_checkpoint
  text = "hello world, the 12 apples.\n" * 6
  (tmp_path / "doc.txt").write_text(text)
  gin.clear_config()
  assert evaluate.main(["--gin_file=gin/eval/perplexity.gin", "--gin_param=perplexity.seq_len = 64",
                        f"--gin_param=perplexity.source = '{tmp_path / 'doc.txt'}'",
                        f"--checkpoint={path}", f"--output={tmp_path / 'eval'}",
                        "--no_progress"]) == 0
  gin.clear_config()
  metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
  ids = vocabularies.get_tokenizer(checkpoints.checkpoint_vocab(path)).encode(text)
  assert metrics["tokens"] == len(ids) - 1
  total = 0.0
  for start in range(0, len(ids) - 1, 64):  # each row of 64 predictions on its own
    chunk = np.asarray(ids[start:start + 65])
    logits = np.asarray(models.apply(cfg, params, chunk[None, :-1]), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total -= float(np.take_along_axis(logp, chunk[1:, None], -1).sum())
  expected = total / (len(ids) - 1)
  # a logit's roundings, the vocabulary's log-sum-exp and the sum over the tokens
  atol = rounding_atol(expected, decoder_terms(cfg, 64) + cfg.vocab_size + len(ids))
  assert metrics["nll"] == pytest.approx(expected, abs=atol)


def test_export_writes_the_carried_tokenizer_and_import_carries_it_back(bpe_checkpoint, tmp_path):
  """maxnucl-to-hf exports CKPT/tokenizer/ (AutoTokenizer then encodes as maxnucl does), and
  hf-to-maxnucl carries the directory's tokenizer files into the new checkpoint."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from maxnucl.conversion import cli, convert  # pylint: disable=import-outside-toplevel

  path, _, _ = bpe_checkpoint
  assert cli.main(["maxnucl-to-hf", "--input", str(path), "--output", str(tmp_path / "hf")]) == 0
  exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = vocabularies.get_tokenizer(checkpoints.checkpoint_vocab(path))
  for text in ("hello world, the 12", "Grüße 🎉 <|im_end|>", "  two\n\nlines"):
    assert exported(text)["input_ids"] == ours.encode(text)
    assert exported.decode(ours.encode(text), skip_special_tokens=True) == text.replace(
        "<|im_end|>", "")
  assert (exported.eos_token_id, exported.pad_token_id) == (ours.eos_id, ours.pad_id)
  convert.hf_to_maxnucl(tmp_path / "hf", tmp_path / "back")
  assert checkpoints.tokenizer_files(tmp_path / "back") == checkpoints.tokenizer_files(path)


def test_pruned_checkpoint_keeps_the_tokenizer(bpe_checkpoint, tmp_path):
  from maxnucl.pruning.prune import prune_ffn_neurons  # pylint: disable=import-outside-toplevel

  path, _, _ = bpe_checkpoint
  prune_ffn_neurons(path, tmp_path / "pruned", method="entropy", ratio=0.25)
  assert checkpoints.tokenizer_files(tmp_path / "pruned") == checkpoints.tokenizer_files(path)
  assert checkpoints.tokenizer_files(tmp_path / "pruned")  # not empty


def test_lm_eval_model_reads_the_carried_tokenizer_without_bos(bpe_checkpoint):
  import maxnucl.lm_eval_adapter  # pylint: disable=import-outside-toplevel

  path, _, _ = bpe_checkpoint
  model = maxnucl.lm_eval_adapter.MaxnuclLM(checkpoint=str(path))
  tokenizer = vocabularies.get_tokenizer(checkpoints.checkpoint_vocab(path))
  assert model.add_bos_token is False
  assert model.tok_encode("hello world") == tokenizer.encode("hello world")
  assert maxnucl.lm_eval_adapter.MaxnuclLM(checkpoint=str(path), add_bos_token="True"
                                           ).tok_encode("hello") == [1] + tokenizer.encode("hello")
