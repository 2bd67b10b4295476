"""The tokenizer that maxnucl-to-hf writes: transformers' AutoTokenizer, loading the export
directory, gives the ids of maxnucl's own tokenizer (maxnucl.data.vocabularies), BOS first,
with the same pad / eos / bos ids; for SentencePiece models trained here and the byte vocabulary."""

import json
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest
import sentencepiece
import transformers

from maxnucl.conversion import cli, convert, hf_tokenizer
from maxnucl.data import vocabularies
import hf_export

TOOL = pathlib.Path(__file__).absolute().parents[1] / "tools" / "convert_checkpoint.py"
# Every file of an export of a plain Gemma-2 small enough for one shard (docs/conversion.md).
MODEL_FILES = {"config.json", "model.safetensors"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  return hf_export.train_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  hf_export.save_tiny_checkpoint(path)
  return path


def _assert_encodes_as_maxnucl(hf, ours):
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (
      ours.pad_id, ours.eos_id, ours.bos_id)
  for text in hf_export.texts():
    ids = ours.encode(text)
    assert hf(text)["input_ids"] == [ours.bos_id] + ids, text
    assert hf.encode(text, add_special_tokens=False) == ids, text
    assert hf.decode(ids) == ours.decode(ids), text


def test_sentencepiece_export_loads_in_autotokenizer_with_maxnucl_ids(ckpt, sp_model, tmp_path):
  convert.maxnucl_to_hf(ckpt, tmp_path / "hf", vocab=str(sp_model))
  assert {p.name for p in (tmp_path / "hf").iterdir()} == (
      MODEL_FILES | TOKENIZER_FILES | {"tokenizer.model"})
  assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  _assert_encodes_as_maxnucl(tokenizer, vocabularies.get_tokenizer(str(sp_model)))
  assert tokenizer.model_max_length == 512  # gemma2_tiny's max_positions


def test_byte_export_loads_in_autotokenizer_with_maxnucl_ids(ckpt, tmp_path):
  convert.maxnucl_to_hf(ckpt, tmp_path / "hf", vocab="byte")
  assert {p.name for p in (tmp_path / "hf").iterdir()} == MODEL_FILES | TOKENIZER_FILES
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  _assert_encodes_as_maxnucl(tokenizer, vocabularies.ByteTokenizer())
  assert len(tokenizer) == vocabularies.BYTE_VOCAB_SIZE


def test_gemma_like_sentencepiece_model_encodes_as_maxnucl(tmp_path):
  """Gemma's own settings: no normalization, no dummy prefix, split digits, user-defined pieces
  (matched in the text as SentencePiece matches them)."""
  sentencepiece.SentencePieceTrainer.train(
      input=str(hf_export.corpus(tmp_path)), model_prefix=str(tmp_path / "gemma_like"),
      vocab_size=384, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n"], minloglevel=2)
  model = str(tmp_path / "gemma_like.model")
  (tmp_path / "hf").mkdir()
  for name, content in hf_tokenizer.tokenizer_files(model, model_max_length=64).items():
    (tmp_path / "hf" / name).write_bytes(content)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = vocabularies.get_tokenizer(model)
  _assert_encodes_as_maxnucl(tokenizer, ours)
  turn = "<start_of_turn>user\n\nhi<end_of_turn>"
  assert tokenizer.encode(turn, add_special_tokens=False) == ours.encode(turn)
  assert ours.encode(turn)[0] == 4  # the user-defined piece, as one token


def test_unigram_sentencepiece_model_is_refused_naming_the_file(ckpt, tmp_path):
  model = vocabularies.train_sentencepiece([hf_export.corpus(tmp_path)], tmp_path / "uni",
                                           vocab_size=384, model_type="unigram")
  with pytest.raises(convert.ConversionError, match=rf"{model}: a SentencePiece unigram model"):
    convert.maxnucl_to_hf(ckpt, tmp_path / "hf", vocab=str(model))
  assert not (tmp_path / "hf").exists()


def _run_cli(*args):
  return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                        text=True)


def test_vocabulary_that_does_not_fit_the_model_is_refused_before_writing(ckpt, tmp_path):
  big = vocabularies.train_sentencepiece([hf_export.corpus(tmp_path)], tmp_path / "big",
                                         vocab_size=600)
  sentencepiece.SentencePieceTrainer.train(
      input=str(hf_export.corpus(tmp_path)), model_prefix=str(tmp_path / "ids"), vocab_size=384,
      byte_fallback=True, pad_id=3, eos_id=2, bos_id=1, unk_id=0, minloglevel=2,
      hard_vocab_limit=False)
  for vocab, message in ((big, "tokens, but model 'gemma2_tiny' has only 384 embeddings"),
                         (tmp_path / "ids.model", "pad id 3, but model 'gemma2_tiny' declares "
                                                  "pad_id 0"),
                         (tmp_path / "missing.model", "SentencePiece model file not found")):
    assert cli.main(["maxnucl-to-hf", "--input", str(ckpt), "--output", str(tmp_path / "hf"),
                     "--vocab", str(vocab)]) == 2
    assert not (tmp_path / "hf").exists()
  result = _run_cli("maxnucl-to-hf", "--input", ckpt, "--output", tmp_path / "hf", "--vocab", big)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: --vocab {big}: {vocabularies.get_tokenizer(str(big)).vocab_size} tokens, but "
      f"model 'gemma2_tiny' has only 384 embeddings"]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")) == []


def test_cli_says_when_it_writes_no_tokenizer(ckpt, tmp_path):
  result = _run_cli("maxnucl-to-hf", "--input", ckpt, "--output", tmp_path / "hf")
  assert result.returncode == 0, result.stderr
  assert "no tokenizer written" in result.stdout and "--vocab" in result.stdout
  assert {p.name for p in (tmp_path / "hf").iterdir()} == MODEL_FILES


def test_workdir_export_writes_the_vocabulary_the_run_recorded(arithmetic_checkpoint, tmp_path,
                                                               sp_model):
  """The README demo's workdir records DATA_VOCAB = 'byte'; a copy of it that records a
  SentencePiece model gets that one (a recorded file that is gone is refused, naming it)."""
  workdir = arithmetic_checkpoint.parents[1]
  result = _run_cli("maxnucl-to-hf", "--input", workdir, "--output", tmp_path / "hf")
  assert result.returncode == 0, result.stderr
  assert f"tokenizer of vocabulary 'byte' (recorded in {workdir / 'operative_config.gin'})" in (
      result.stdout)
  assert {p.name for p in (tmp_path / "hf").iterdir()} == MODEL_FILES | TOKENIZER_FILES
  copy = shutil.copytree(workdir, tmp_path / "workdir")
  record = copy / "operative_config.gin"
  record.write_text(record.read_text().replace("DATA_VOCAB = 'byte'", f"DATA_VOCAB = '{sp_model}'"))
  config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert config["bos_token"] == "<bos>"
  assert cli.main(["maxnucl-to-hf", "--input", str(copy), "--output", str(tmp_path / "hf_sp")]) == 0
  assert (tmp_path / "hf_sp" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
  record.write_text(record.read_text().replace(str(sp_model), str(tmp_path / "gone.model")))
  result = _run_cli("maxnucl-to-hf", "--input", copy, "--output", tmp_path / "hf_gone")
  assert result.returncode == 2
  assert f"{record} records the vocabulary {tmp_path / 'gone.model'}, which is not a file" in (
      result.stderr)
  assert not (tmp_path / "hf_gone").exists()
  assert cli.main(["maxnucl-to-hf", "--input", str(copy), "--output", str(tmp_path / "hf_none"),
                   "--vocab", "none"]) == 0
  assert {p.name for p in (tmp_path / "hf_none").iterdir()} == MODEL_FILES


PERPLEXITY_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin" / "eval" / "perplexity.gin"


def test_generate_and_evaluate_read_a_workdir_with_the_vocabulary_its_run_recorded(
    arithmetic_checkpoint, tmp_path, sp_model, capsys):
  """Without --vocab, generate and evaluate tokenize a training workdir's model with the
  vocabulary its run recorded (they used bytes whatever the run had used, and a SentencePiece
  model was scored on the wrong tokens without a word), say which, and give what --vocab gives."""
  from maxnucl import evaluate, generate  # pylint: disable=import-outside-toplevel
  copy = shutil.copytree(arithmetic_checkpoint.parents[1], tmp_path / "workdir")
  record = copy / "operative_config.gin"
  record.write_text(record.read_text().replace("DATA_VOCAB = 'byte'", f"DATA_VOCAB = '{sp_model}'"))
  assert generate.model_vocab(copy) == (str(sp_model), f"recorded in {record}")
  assert generate.model_vocab(copy, "byte") == ("byte", "--vocab")
  prompt = ["--checkpoint", str(copy), "--prompt", "Q: 2 + 3?", "--max_new_tokens", "4"]
  assert generate.main(prompt) == 0
  recorded = capsys.readouterr()
  assert f"vocabulary: {sp_model} (recorded in {record})" in recorded.err
  assert generate.main(prompt + ["--vocab", str(sp_model)]) == 0
  assert capsys.readouterr().out == recorded.out
  assert generate.main(prompt + ["--vocab", "byte"]) == 0
  assert capsys.readouterr().out != recorded.out  # another tokenization, another continuation
  results = {}
  for name, extra in (("recorded", []), ("given", ["--vocab", str(sp_model)])):
    gin.clear_config()
    assert evaluate.main(["--gin_file", str(PERPLEXITY_GIN), "--gin_param",
                          "perplexity.seq_len = 64", "--checkpoint", str(copy), "--output",
                          str(tmp_path / name), "--limit", "4", "--no_progress", *extra]) == 0
    gin.clear_config()
    results[name] = json.loads((tmp_path / name / "results.json").read_text())["metrics"]
  assert f"vocabulary: {sp_model} (recorded in {record})" in capsys.readouterr().out
  assert results["recorded"] == results["given"]
  record.write_text(record.read_text().replace(str(sp_model), str(tmp_path / "gone.model")))
  assert generate.main(prompt) == 2
  assert f"{record} records the vocabulary {tmp_path / 'gone.model'}" in capsys.readouterr().err
