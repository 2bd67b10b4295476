"""`python -m maxnucl.generate`: prints the continuation that `decoding.generate` produces, from a
checkpoint or a training workdir, with the byte vocabulary by default; clear errors."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

from maxnucl import checkpoints, decoding, generate, models
from maxnucl.data import vocabularies

REPO = pathlib.Path(__file__).resolve().parent.parent
BYTES = vocabularies.ByteTokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = jax.tree.map(lambda x: x * 2.0, models.init(cfg, jax.random.PRNGKey(5)))
  path = tmp_path_factory.mktemp("generate") / "ckpt"
  checkpoints.save(path, cfg, params)
  return path, cfg, params


def _expected(cfg, params, prompt, max_new_tokens, **kwargs):
  tokens = decoding.generate(cfg, params, [[BYTES.bos_id] + BYTES.encode(prompt)],
                             max_new_tokens, stop_token_ids=[BYTES.eos_id], **kwargs)[0]
  return BYTES.decode(tokens)


def test_command_prints_the_generated_continuation(checkpoint):
  path, cfg, params = checkpoint
  prompt = "Q: Ada has 3 apples.\nA: "
  result = subprocess.run(
      [sys.executable, "-m", "maxnucl.generate", "--checkpoint", str(path), "--prompt", prompt,
       "--max_new_tokens", "12"], capture_output=True, text=True, cwd=REPO, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert result.stdout == _expected(cfg, params, prompt, 12) + "\n"


def test_workdir_means_its_latest_step_and_prompts_batch(checkpoint, tmp_path, capsys):
  path, cfg, params = checkpoint
  for step in (5, 10):
    shutil.copytree(path, tmp_path / "checkpoints" / str(step))
  assert checkpoints.resolve(tmp_path) == tmp_path / "checkpoints" / "10"
  prompt_file = tmp_path / "prompt.txt"
  prompt_file.write_text("line one\nline two: ")
  code = generate.main(["--checkpoint", str(tmp_path), "--prompt", "hello", "--prompt_file",
                        str(prompt_file), "--max_new_tokens", "6", "--temperature", "0.8",
                        "--top_k", "20", "--seed", "3"])
  assert code == 0
  expected = decoding.generate(
      cfg, params, [[BYTES.bos_id] + BYTES.encode(p) for p in ("hello", prompt_file.read_text())],
      6, temperature=0.8, top_k=20, seed=3, stop_token_ids=[BYTES.eos_id])
  assert capsys.readouterr().out == "".join(
      f"--- prompt {i}\n{BYTES.decode(t)}\n" for i, t in enumerate(expected))


def test_stop_strings_cut_the_printed_text(checkpoint, capsys):
  path, cfg, params = checkpoint
  full = _expected(cfg, params, "abc", 20)
  stop = full[3:5]
  assert generate.main(["--checkpoint", str(path), "--prompt", "abc", "--max_new_tokens", "20",
                        "--stop", stop]) == 0
  assert capsys.readouterr().out == full[:full.index(stop)] + "\n"


def test_errors_name_the_problem(checkpoint, tmp_path, capsys):
  path, _, _ = checkpoint
  assert generate.main(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert generate.main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
  assert "neither a maxnucl checkpoint" in capsys.readouterr().err
  assert generate.main(["--checkpoint", str(path), "--prompt", "x",
                        "--temperature", "-1"]) == 2
  assert "temperature = -1.0" in capsys.readouterr().err
  small = models.get_config("gemma2_tiny", num_layers=1, vocab_size=200)
  checkpoints.save(tmp_path / "small", small, models.init(small, jax.random.PRNGKey(0)))
  assert generate.main(["--checkpoint", str(tmp_path / "small"), "--prompt", "x"]) == 2
  assert "'byte' has 259 tokens but model 'gemma2_tiny' has only 200" in capsys.readouterr().err


def _one_error_line(capsys):
  err = [line for line in capsys.readouterr().err.splitlines()
         if line.strip() and not line.startswith("vocabulary:")]
  assert len(err) == 1, err
  return err[0]


def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(checkpoint, tmp_path, capsys):
  prompt = tmp_path / "prompt.txt"
  prompt.write_bytes(b"Q: one\nQ: tw\xffo\n")
  assert generate.main(["--checkpoint", str(checkpoint[0]), "--prompt_file", str(prompt)]) == 2
  line = _one_error_line(capsys)
  assert line.startswith("error: ") and "prompt.txt" in line and "line 2" in line
  assert "UTF-8" in line


@pytest.mark.parametrize("content", [b"not a sentencepiece model", b"", b"\x0a\x05\xff" * 40])
def test_a_vocab_file_that_is_no_tokenizer_is_refused_before_the_model_is_loaded(
    checkpoint, tmp_path, capsys, monkeypatch, content):
  """`generate --vocab FILE` where FILE is not a SentencePiece model used to end in
  sentencepiece's RuntimeError traceback."""
  vocab = tmp_path / "tokenizer.model"
  vocab.write_bytes(content)
  monkeypatch.setattr(generate, "load_model",
                      lambda *a, **k: pytest.fail("the model was loaded before the check"))
  assert generate.main(["--checkpoint", str(checkpoint[0]), "--prompt", "x", "--vocab",
                        str(vocab)]) == 2
  line = _one_error_line(capsys)
  assert line.startswith("error: --vocab ") and str(vocab) in line
  assert "SentencePiece" in line
