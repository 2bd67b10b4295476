"""The lm-evaluation-harness adapter: the harness, offline, on small local tasks (task YAMLs over
jsonl files written here) gives exactly the native `decoding.score` / `generate` results."""

import inspect
import json
import math
import os
import pathlib
import subprocess
import sys

import shutil

import lm_eval
import numpy as np
import pytest
from lm_eval.tasks import TaskManager

import maxnucl.lm_eval_adapter  # registers the "maxnucl" model
from maxnucl import checkpoints, decoding
from maxnucl.data import synthetic, vocabularies
from test_disk_full import assert_one_line_naming, run_on_full_disk
from tolerances import EPS64, decoder_terms, magnitude, rounding_atol

MAX_LENGTH = 96  # model_args max_length: documents of ~250 bytes need several rolling windows

MC_DOCS = [{"question": q, "choices": c, "label": i % len(c)} for i, (q, c) in enumerate([
    ("On trees?", ["apple", "banana", "cherry pie"]),
    ("On vines?", ["grape", "melon"]),
    ("Which fruit grows on the low bushes of the cold north, where summers are short and "
     "winters are long and dark?", ["blueberry", "raspberry", "kiwi", "fig"]),
    ("On palms?", ["date", "coconut", "lime"])])]
# Held-out problems of the task the fixture's model was trained on: its answers have lines.
GEN_DOCS = [synthetic.arithmetic_problem(0, "test", i) for i in range(4)]
TEXT_DOCS = [{"text": "Q: Ada has 3 apples, gets 4 more and gives away 2. How many now?\nA: "
                      "3 + 4 = 7\n7 - 2 = 5\n#### 5\n" * 3},
             {"text": "Outgoing connections of feed-forward neurons differ in entropy; "
                      "low-entropy neurons matter most. " * 4}]


def _task(directory: pathlib.Path, name: str, docs: list, body: str) -> None:
  data = directory / f"{name}.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (directory / f"{name}.yaml").write_text(
      f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
      f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, arithmetic_checkpoint):
  """The CPU demo's trained tiny Gemma-2 (byte vocabulary; it writes answers of several lines,
  so stop strings matter) and three local tasks."""
  root = tmp_path_factory.mktemp("lm_eval")
  shutil.copytree(arithmetic_checkpoint, root / "ckpt")
  tasks = root / "tasks"
  tasks.mkdir()
  _task(tasks, "maxnucl_test_mc", MC_DOCS,
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n'
        '  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n')
  _task(tasks, "maxnucl_test_gen", GEN_DOCS,
        'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA: "\n'
        'doc_to_target: "{{answer.split(\'\\n\')[0]}}"\ngeneration_kwargs:\n'
        '  until: ["\\n"]\n  max_gen_toks: 16\n  do_sample: false\nmetric_list:\n'
        '  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n')
  _task(tasks, "maxnucl_test_rolling", TEXT_DOCS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
  loaded_cfg, loaded = checkpoints.load(root / "ckpt")
  return root, loaded_cfg, loaded


@pytest.fixture(scope="module")
def harness(setup):
  root, _, _ = setup
  return lm_eval.simple_evaluate(
      model="maxnucl", model_args=f"checkpoint={root / 'ckpt'},vocab=byte,max_length={MAX_LENGTH}",
      tasks=["maxnucl_test_mc", "maxnucl_test_gen", "maxnucl_test_rolling"],
      task_manager=TaskManager(include_path=str(root / "tasks")), log_samples=True,
      batch_size=3)


BYTES = vocabularies.ByteTokenizer()


def _ids(text):
  return BYTES.encode(text)


def test_multiple_choice_scores_equal_native_score(setup, harness):
  _, cfg, params = setup
  samples = harness["samples"]["maxnucl_test_mc"]
  assert len(samples) == len(MC_DOCS)
  correct = []
  assert len(MC_DOCS[2]["question"]) > MAX_LENGTH  # one context is truncated
  for sample in samples:
    doc = MC_DOCS[sample["doc_id"]]
    continuations = [_ids(" " + choice) for choice in doc["choices"]]
    # A context that does not fit max_length loses its start (as the harness's HF model does).
    contexts = [([BYTES.bos_id] + _ids(doc["question"]))[-(MAX_LENGTH + 1 - len(c)):]
                for c in continuations]
    native = decoding.score(cfg, params, contexts, continuations)
    harness_scores = [resp[0][0] for resp in sample["resps"]]
    # batched with other requests (other padding, other sums): a logit's roundings, the
    # vocabulary's, then the continuation's sum
    atol = rounding_atol(magnitude(native), decoder_terms(cfg, MAX_LENGTH) + cfg.vocab_size
                         + max(map(len, continuations)))
    np.testing.assert_allclose(harness_scores, native, atol=atol)
    correct.append(int(np.argmax(native)) == doc["label"])
  # a float64 mean of 0/1 values: the sum's roundings and the division (tests/tolerances.py)
  assert harness["results"]["maxnucl_test_mc"]["acc,none"] == pytest.approx(
      np.mean(correct), abs=rounding_atol(1.0, len(correct) + 1, EPS64))


def test_generate_until_equals_native_generate(setup, harness):
  _, cfg, params = setup
  samples = harness["samples"]["maxnucl_test_gen"]
  assert len(samples) == len(GEN_DOCS)
  stopped = 0
  for sample in samples:
    doc = GEN_DOCS[sample["doc_id"]]
    prompt = [BYTES.bos_id] + _ids(f"Q: {doc['question']}\nA: ")
    assert len(prompt) + 16 <= MAX_LENGTH
    tokens = decoding.generate(cfg, params, [prompt], 16, stop_token_ids=[BYTES.eos_id])[0]
    text = BYTES.decode(tokens)
    native = decoding.cut_at_stop(text, ["\n"])
    assert sample["filtered_resps"][0] == native
    stopped += "\n" in text
  assert stopped >= 2  # the stop string did end generations
  exact = np.mean([s["filtered_resps"][0] == s["target"] for s in samples])
  assert harness["results"]["maxnucl_test_gen"]["exact_match,none"] == pytest.approx(
      exact, abs=rounding_atol(1.0, len(samples) + 1, EPS64))  # the same


def test_rolling_loglikelihood_equals_native_rolling_score(setup, harness):
  _, cfg, params = setup
  samples = harness["samples"]["maxnucl_test_rolling"]
  for sample in samples:
    text = TEXT_DOCS[sample["doc_id"]]["text"]
    assert len(_ids(text)) > 2 * MAX_LENGTH  # several windows
    native = decoding.score_rolling(cfg, params, [_ids(text)], max_length=MAX_LENGTH)[0]
    atol = rounding_atol(abs(native), decoder_terms(cfg, MAX_LENGTH) + cfg.vocab_size
                         + len(_ids(text)))
    assert sample["resps"][0][0] == pytest.approx(native, abs=atol)
  # bits per byte from the harness = -sum(loglik) / (ln 2 * bytes), over all documents.
  totals = decoding.score_rolling(cfg, params, [_ids(d["text"]) for d in TEXT_DOCS],
                                  max_length=MAX_LENGTH)
  expected = -sum(totals) / (math.log(2) * sum(len(d["text"].encode()) for d in TEXT_DOCS))
  # the documents' log-likelihoods (all negative) each within its roundings as above, so their
  # sum within the largest count of roundings (the tokens of all documents) times |expected|
  atol = rounding_atol(abs(expected), decoder_terms(cfg, MAX_LENGTH) + cfg.vocab_size
                       + sum(len(_ids(d["text"])) for d in TEXT_DOCS))
  assert harness["results"]["maxnucl_test_rolling"]["bits_per_byte,none"] == pytest.approx(
      expected, abs=atol)


SCRIPT = pathlib.Path(sys.executable).parent / "maxnucl-lm-eval"  # the installed entry point


def test_command_line_runs_the_harness_and_names_the_results_after_the_checkpoint(
    setup, harness, tmp_path):
  """lm-eval names an hf run after `pretrained` (OUTPUT/<pretrained, '/' -> '__'>/); a maxnucl
  run is named after its checkpoint the same way, not randomly."""
  root, _, _ = setup
  checkpoint = root / "ckpt"
  result = subprocess.run(
      [str(SCRIPT), "--model", "maxnucl", "--model_args", f"checkpoint={checkpoint},vocab=byte",
       "--tasks", "maxnucl_test_mc", "--include_path", str(root / "tasks"), "--batch_size", "2",
       "--output_path", str(tmp_path)],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  written = list(tmp_path.rglob("results_*.json"))
  assert len(written) == 1
  assert written[0].parent == tmp_path / str(checkpoint).replace("/", "__")
  results = json.loads(written[0].read_text())
  assert results["model_name"] == str(checkpoint)
  acc = results["results"]["maxnucl_test_mc"]["acc,none"]
  assert acc == harness["results"]["maxnucl_test_mc"]["acc,none"]


def test_command_line_on_a_full_disk_exits_1_in_one_line_naming_the_results_file(setup, tmp_path):
  """The harness's results file could not be written: one line naming it, exit 1 (a failure
  while working), as every maxnucl command (tests/test_disk_full.py)."""
  root, _, _ = setup
  disk = tmp_path / "lm_eval" / "disk"
  proc, _ = run_on_full_disk(
      [SCRIPT, "--model", "maxnucl", "--model_args", f"checkpoint={root / 'ckpt'},vocab=byte",
       "--tasks", "maxnucl_test_mc", "--include_path", root / "tasks", "--batch_size", "2",
       "--output_path", disk / "results"], tmp_path, "lm_eval", free=0)
  assert_one_line_naming(proc, disk / "results")


def test_help_describes_the_maxnucl_model_and_every_model_argument():
  arguments = [name for name in inspect.signature(maxnucl.lm_eval_adapter.MaxnuclLM).parameters
               if name not in ("batch_size", "harness_args")]  # --batch_size is lm-eval's own
  assert arguments[0] == "checkpoint" and "add_bos_token" in arguments
  for command in (["--help"], ["run", "--help"]):
    result = subprocess.run([str(SCRIPT), *command], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--model maxnucl --model_args checkpoint=" in result.stdout, command
    described = {line.split()[0] for line in result.stdout.splitlines()
                 if line.startswith("  ") and not line.startswith("   ")}
    assert set(arguments) <= described, (command, set(arguments) - described)


def test_unknown_model_argument_is_named(setup):
  root, _, _ = setup
  with pytest.raises(ValueError, match=r"unknown argument\(s\) \['vocabulary'\]"):
    maxnucl.lm_eval_adapter.MaxnuclLM(checkpoint=str(root / "ckpt"), vocabulary="byte")
