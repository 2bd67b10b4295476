"""`python -m maxnucl.evaluate` and `maxnucl.evaluation`: GSM8K scoring and protocol, the
resumable prediction loop, the one held-out NLL, and evaluation inside training and pruning."""

import json
import os
import pathlib
import re
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import processes
from cli_messages import message_lines
from maxnucl import checkpoints, evaluate, models, sharding, train
from maxnucl.data import pipeline, vocabularies
from maxnucl.evaluation import core, gsm8k, perplexity
from maxnucl.pruning import calibration, prune
from tolerances import EPS32, decoder_terms, rounding_atol

REPO = pathlib.Path(__file__).resolve().parent.parent
BYTES = vocabularies.ByteTokenizer()
ARITHMETIC = dict(source="synthetic_arithmetic", num_shots=0,
                  question_template="Q: {question}\nA: ", max_new_tokens=48,
                  stop_strings=("Q:",))


# ---- GSM8K scoring ----------------------------------------------------------------------------

REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1000"


@pytest.mark.parametrize("prediction,strict,flexible", [
    ("She sold 1000 in total.\n#### 1000", True, True),
    ("#### 1,000.00", True, True),  # "," and trailing zeros: the same number
    ("#### $1,000.", True, True),  # "$" and a trailing "."
    ("The answer is 1000.", False, True),  # no "####": only the flexible match
    ("#### 1000\nQuestion: next one has 7 apples", True, False),  # flexible = last number (7)
    ("#### 999", False, False),
    ("#### 1000.5", False, False),
    ("no number at all", False, False),
    ("#### -1000", False, False),
])
def test_gsm8k_score_compares_answers_as_numbers(prediction, strict, flexible):
  assert gsm8k.score(prediction, REFERENCE) == {"strict": strict, "flexible": flexible}


def test_gsm8k_reference_without_final_answer_is_an_error():
  with pytest.raises(core.EvaluationError, match="no '#### <number>'"):
    gsm8k.score("#### 3", "the answer is three")


def test_gsm8k_prompt_has_fixed_train_exemplars_then_the_question(offline_data):
  from maxnucl.data import sources  # pylint: disable=import-outside-toplevel
  train_records, test_records = sources.read_gsm8k("train"), sources.read_gsm8k("test")
  bench = gsm8k.GSM8K(num_shots=2, seed=3)
  examples = bench.examples()
  assert [e["reference"] for e in examples] == [r["answer"] for r in test_records]
  prefix = bench.few_shot_prefix()
  shots = prefix.split("\n\n")[:-1]
  assert len(shots) == 2
  for shot in shots:  # each exemplar is a whole train example in the Question/Answer format
    assert any(shot == f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train_records)
  for example, record in zip(examples, test_records):
    assert example["prompt"] == prefix + f"Question: {record['question']}\nAnswer: "
  assert gsm8k.GSM8K(num_shots=2, seed=3).few_shot_prefix() == prefix  # fixed by the seed


def test_synthetic_arithmetic_results_are_named_after_it_with_gsm8k_metrics(tmp_path):
  results = core.run_benchmark(gsm8k.GSM8K(**ARITHMETIC), _CountingModel(), tmp_path, limit=4,
                               progress=False)
  assert results["benchmark"] == "synthetic_arithmetic"
  assert json.loads((tmp_path / core.RESULTS).read_text())["benchmark"] == "synthetic_arithmetic"
  assert set(results["metrics"]) == {"accuracy_strict", "accuracy_flexible", "num_examples"}
  assert evaluate.format_results(results).startswith("synthetic_arithmetic on ")
  assert gsm8k.GSM8K().name == "gsm8k"


def test_trained_model_scores_above_zero_and_untrained_scores_zero(arithmetic_checkpoint):
  """The CPU demo's model answers some held-out arithmetic problems; the same model with its
  initial (random) weights answers none."""
  bench = gsm8k.GSM8K(**ARITHMETIC)
  trained = core.LanguageModel.load(str(arithmetic_checkpoint), "byte", batch_size=32)
  results = core.run_benchmark(bench, trained, "", limit=200, write_files=False, progress=False)
  assert results["metrics"]["accuracy_strict"] > 0
  untrained = core.LanguageModel(trained.cfg, models.init(trained.cfg, jax.random.PRNGKey(0)),
                                 BYTES, batch_size=32)
  results = core.run_benchmark(bench, untrained, "", limit=200, write_files=False,
                               progress=False)
  assert results["metrics"]["accuracy_strict"] == 0
  assert results["metrics"]["accuracy_flexible"] == 0


# ---- the resumable loop -----------------------------------------------------------------------

class _Interrupted(RuntimeError):
  pass


class _CountingModel:
  """A LanguageModel stand-in that answers "#### <question length>" and can fail on call k."""

  def __init__(self, fail_on_call=None):
    self.prompts, self.calls, self.fail_on_call = [], 0, fail_on_call
    self.cfg = models.get_config("gemma2_tiny")
    self.batch_size = 4

  def generate(self, prompts, *, max_new_tokens, stop_strings=(), **unused):
    self.calls += 1
    if self.calls == self.fail_on_call:
      raise _Interrupted("killed")
    self.prompts += list(prompts)
    return [f"#### {len(p) % 7}" for p in prompts]


def test_interrupted_run_resumes_skipping_examples_already_predicted(tmp_path, offline_data):
  del offline_data
  bench = gsm8k.GSM8K(**ARITHMETIC)
  with pytest.raises(_Interrupted):
    core.run_benchmark(bench, _CountingModel(fail_on_call=3), tmp_path, limit=40, chunk_size=8,
                       progress=False)
  written = (tmp_path / core.PREDICTIONS).read_text().splitlines()
  assert len(written) == 16  # two chunks finished before the "crash"
  # A crash while writing leaves a partial last line: dropped, and that example redone.
  with (tmp_path / core.PREDICTIONS).open("a") as f:
    f.write('{"id": "test-16", "prompt": "Q: trunc')
  resumed_model = _CountingModel()
  resumed = core.run_benchmark(bench, resumed_model, tmp_path, limit=40, chunk_size=8,
                               progress=False)
  assert len(resumed_model.prompts) == 24  # only the 24 examples not yet predicted
  assert resumed["num_resumed"] == 16
  fresh = core.run_benchmark(bench, _CountingModel(), tmp_path / "fresh", limit=40, chunk_size=8,
                             progress=False)
  assert resumed["metrics"] == fresh["metrics"]
  lines = [json.loads(l) for l in (tmp_path / core.PREDICTIONS).read_text().splitlines()]
  assert sorted(r["id"] for r in lines) == sorted(f"test-{i}" for i in range(40))
  assert json.loads((tmp_path / core.RESULTS).read_text())["num_examples"] == 40


def test_resuming_with_other_settings_is_refused(tmp_path):
  core.run_benchmark(gsm8k.GSM8K(**ARITHMETIC), _CountingModel(), tmp_path, limit=4,
                     progress=False)
  other = gsm8k.GSM8K(**{**ARITHMETIC, "max_new_tokens": 99})
  with pytest.raises(core.EvaluationError, match="settings"):
    core.run_benchmark(other, _CountingModel(), tmp_path, limit=4, progress=False)


def _folder_bytes(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_command_refuses_other_settings_into_an_existing_result_unless_overwrite(tmp_path,
                                                                                 capsys):
  """A finished evaluation is not replaced by one of a smaller --limit (exit 2, the folder byte
  for byte as it was) unless --overwrite; the same settings resume it, a larger limit extends
  it."""
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  checkpoints.save(tmp_path / "ckpt", cfg, models.init(cfg, jax.random.PRNGKey(6)))
  (tmp_path / "doc.txt").write_text("Outgoing connections of feed-forward neurons.\n" * 5)
  out = tmp_path / "eval"
  flags = ["--gin_file=gin/eval/perplexity.gin", "--gin_param=perplexity.seq_len = 64",
           f"--gin_param=perplexity.source = '{tmp_path / 'doc.txt'}'", "--batch_size", "4",
           f"--checkpoint={tmp_path / 'ckpt'}", f"--output={out}", "--no_progress"]

  def run(*extra):
    gin.clear_config()
    code = evaluate.main(flags + list(extra))
    gin.clear_config()
    return code, capsys.readouterr()

  assert run()[0] == 0
  finished = _folder_bytes(out)
  assert json.loads(finished[pathlib.Path(core.RESULTS)])["num_examples"] == 4
  code, printed = run("--limit", "2")
  assert code == 2 and _folder_bytes(out) == finished
  assert printed.err == (f"error: {out} holds the evaluation of other settings (limit: None "
                         f"there, 2 now); pass --overwrite to replace it, or choose another "
                         f"--output\n")
  code, _ = run()  # the same settings: everything resumed
  resumed = json.loads((out / core.RESULTS).read_text())
  assert code == 0 and resumed["num_resumed"] == resumed["num_examples"] == 4
  code, _ = run("--limit", "2", "--overwrite")
  replaced = json.loads((out / core.RESULTS).read_text())
  assert code == 0 and replaced["num_examples"] == 2 and replaced["num_resumed"] == 0
  assert len((out / core.PREDICTIONS).read_text().splitlines()) == 2
  assert json.loads((out / core.RUN).read_text())["limit"] == 2
  code, _ = run()  # no limit: the 2 predictions reused, the other 2 added
  extended = json.loads((out / core.RESULTS).read_text())
  assert code == 0 and extended["num_resumed"] == 2 and extended["num_examples"] == 4
  assert extended["metrics"] == json.loads(finished[pathlib.Path(core.RESULTS)])["metrics"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "doc.txt", "eval"]


# ---- the one held-out NLL ---------------------------------------------------------------------

def _nll_atol(cfg, nll, length, tokens):
  """A mean next-token NLL over `tokens` tokens of rows of `length`, computed by another program
  (other batches, shards, fusions; or numpy in float64 from the logits): a logit's roundings,
  the vocabulary's log-sum-exp and the sum over the tokens (tests/tolerances.py)."""
  return rounding_atol(abs(nll), decoder_terms(cfg, length) + cfg.vocab_size + int(tokens))


def _numpy_nll(cfg, params, batch):
  logits = np.asarray(models.apply(cfg, params, batch["tokens"], batch["segment_ids"],
                                   batch["positions"]), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return float((token * batch["loss_mask"]).sum()), float(batch["loss_mask"].sum())


def test_trainer_pruner_and_evaluator_report_the_same_heldout_nll(offline_data):
  del offline_data
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(2))
  rows = pipeline.build_packed_rows("synthetic_arithmetic", "test", seq_len=64, shuffle=False)
  batch = rows.rows(np.arange(8))
  expected_sum, tokens = _numpy_nll(cfg, params, batch)
  expected = expected_sum / tokens
  nll_sum, count = train.eval_step(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                   cfg=cfg)
  atol = _nll_atol(cfg, expected, batch["tokens"].shape[1], tokens)
  assert float(nll_sum) / float(count) == pytest.approx(expected, abs=atol)
  assert calibration.perplexity(cfg, params, [batch])["nll"] == pytest.approx(expected, abs=atol)
  bench = perplexity.Perplexity(source="synthetic_arithmetic", split="test", seq_len=64,
                                loss_on_inputs=False, vocab="byte")
  model = core.LanguageModel(cfg, params, BYTES, batch_size=4)
  results = core.run_benchmark(bench, model, "", limit=8, write_files=False, progress=False)
  assert results["metrics"]["nll"] == pytest.approx(expected, abs=atol)
  # exp(nll): the perplexity times the NLL's error, and exp's own rounding
  assert results["metrics"]["perplexity"] == pytest.approx(
      np.exp(expected), abs=np.exp(expected) * (atol + EPS32))
  assert results["metrics"]["tokens"] == tokens


def test_perplexity_of_a_text_file_scores_every_token_after_bos(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(4))
  text = "Outgoing connections of feed-forward neurons.\n" * 5  # 235 bytes: 4 rows of 64
  (tmp_path / "doc.txt").write_text(text)
  bench = perplexity.Perplexity(source=str(tmp_path / "doc.txt"), seq_len=64, vocab="byte")
  model = core.LanguageModel(cfg, params, BYTES, batch_size=4)
  results = core.run_benchmark(bench, model, "", write_files=False, progress=False)
  ids = [BYTES.bos_id] + BYTES.encode(text)
  assert results["metrics"]["tokens"] == len(ids) - 1 and results["metrics"]["num_rows"] == 4
  total = 0.0
  for start in range(0, len(ids) - 1, 64):  # each row of 64 predictions on its own
    chunk = np.asarray(ids[start:start + 65])
    n = len(chunk) - 1
    total += _numpy_nll(cfg, params, {"tokens": chunk[None, :-1], "targets": chunk[None, 1:],
                                      "loss_mask": np.ones((1, n)),
                                      "segment_ids": np.ones((1, n), np.int32),
                                      "positions": np.arange(n)[None]})[0]
  expected = total / (len(ids) - 1)
  assert results["metrics"]["nll"] == pytest.approx(
      expected, abs=_nll_atol(cfg, expected, 64, len(ids) - 1))


def test_evaluator_on_a_mesh_restores_the_model_sharded_and_equals_one_device(tmp_path,
                                                                             monkeypatch, capsys):
  """`--mesh_shape 2,-1,1`: the checkpoint is restored sharded over the 8 devices, the 4 text
  rows (padded to the 8 batch shards) give the perplexity of the single-device run."""
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  checkpoints.save(tmp_path / "ckpt", cfg, models.init(cfg, jax.random.PRNGKey(4)))
  text = "Outgoing connections of feed-forward neurons.\n" * 5  # 230 bytes: 4 rows of <= 64
  (tmp_path / "doc.txt").write_text(text)
  evaluated = []
  run = core.run_benchmark
  monkeypatch.setattr(core, "run_benchmark",
                      lambda bench, model, *a, **k: evaluated.append(model) or run(bench, model,
                                                                                   *a, **k))
  flags = ["--gin_file=gin/eval/perplexity.gin", "--gin_param=perplexity.seq_len = 64",
           f"--gin_param=perplexity.source = '{tmp_path / 'doc.txt'}'", "--batch_size", "3",
           f"--checkpoint={tmp_path / 'ckpt'}", "--no_progress"]
  results = {}
  for name, mesh_flags in (("one_device", []), ("mesh", ["--mesh_shape", "2,-1,1"])):
    gin.clear_config()
    assert evaluate.main(flags + [f"--output={tmp_path / name}"] + mesh_flags) == 0
    results[name] = json.loads((tmp_path / name / core.RESULTS).read_text())["metrics"]
  gin.clear_config()
  assert evaluate.main(flags + [f"--output={tmp_path / 'bad'}", "--mesh_shape", "1,-1"]) == 2
  assert "--mesh_shape '1,-1': expected three integers" in capsys.readouterr().err
  gin.clear_config()
  single, sharded = (model.params["layers_0"]["mlp"]["gate"] for model in evaluated)
  assert len(single.sharding.device_set) == 1
  assert len(sharded.sharding.device_set) == 8 and not sharded.sharding.is_fully_replicated
  assert results["mesh"]["tokens"] == results["one_device"]["tokens"] == len(text)
  assert results["mesh"]["num_rows"] == 4
  single_nll = results["one_device"]["nll"]
  assert results["mesh"]["nll"] == pytest.approx(
      single_nll, abs=_nll_atol(cfg, single_nll, 64, len(text)))


def test_two_processes_resume_and_evaluate_perplexity_like_one(tmp_path):
  """Two processes of 2 CPU devices each resume a run that one process started (process 0 reads
  predictions.jsonl and sends the resumed records to process 1), evaluate the rest together on a
  4-device mesh; process 0 alone writes and prints; the metrics equal a single-process run."""
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  checkpoints.save(tmp_path / "ckpt", cfg, models.init(cfg, jax.random.PRNGKey(5)))
  (tmp_path / "doc.txt").write_text("Neurons whose outgoing weights are spread out.\n" * 6)
  flags = ["--gin_file=gin/eval/perplexity.gin", "--gin_param=perplexity.seq_len = 64",
           f"--gin_param=perplexity.source = '{tmp_path / 'doc.txt'}'", "--batch_size", "2",
           f"--checkpoint={tmp_path / 'ckpt'}", "--no_progress"]
  expected = {}
  for output, limit in (("one_process", []), ("two_processes", ["--limit", "2"])):
    gin.clear_config()
    assert evaluate.main(flags + [f"--output={tmp_path / output}"] + limit) == 0
    expected[output] = json.loads((tmp_path / output / core.RESULTS).read_text())["metrics"]
  gin.clear_config()
  assert expected["two_processes"]["num_rows"] == 2
  outputs = processes.run(["-m", "maxnucl.evaluate", *flags,
                            f"--output={tmp_path / 'two_processes'}"])
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  assert "perplexity" in outputs[0][1]
  assert processes.printed_lines(outputs[1][1]) == []
  assert "compiling the NLL step" in outputs[0][2] and "compil" not in outputs[1][2]
  results = json.loads((tmp_path / "two_processes" / core.RESULTS).read_text())
  assert results["num_resumed"] == 2 and results["num_examples"] == 5
  assert results["metrics"]["tokens"] == expected["one_process"]["tokens"]
  single = expected["one_process"]
  assert results["metrics"]["nll"] == pytest.approx(
      single["nll"], abs=_nll_atol(cfg, single["nll"], 64, single["tokens"]))
  lines = (tmp_path / "two_processes" / core.PREDICTIONS).read_text().splitlines()
  assert sorted(json.loads(l)["id"] for l in lines) == [f"row-{i}" for i in range(5)]


def test_two_processes_generate_the_answers_of_one(arithmetic_checkpoint, tmp_path):
  """GSM8K-style generation with two processes (a 4-device mesh over both) writes the
  predictions of a single-process run."""
  flags = ["--gin_file=gin/eval/synthetic_arithmetic.gin", f"--checkpoint={arithmetic_checkpoint}",
           "--limit", "6", "--batch_size", "4", "--no_progress"]
  one = subprocess.run([sys.executable, "-m", "maxnucl.evaluate", *flags,
                        f"--output={tmp_path / 'one'}"], capture_output=True, text=True, cwd=REPO,
                       timeout=600, env=processes.cpu_env(1))
  assert one.returncode == 0, one.stderr[-2000:]
  for code, _, err in processes.run(["-m", "maxnucl.evaluate", *flags,
                                     f"--output={tmp_path / 'two'}"], timeout=600):
    assert code == 0, err[-3000:]

  def predictions(name):
    lines = (tmp_path / name / core.PREDICTIONS).read_text().splitlines()
    return sorted((r["id"], r["output"]) for r in map(json.loads, lines))
  assert predictions("two") == predictions("one") and len(predictions("one")) == 6
  two = json.loads((tmp_path / "two" / core.RESULTS).read_text())
  assert two["metrics"] == json.loads((tmp_path / "one" / core.RESULTS).read_text())["metrics"]


# ---- the command line, training and pruning ---------------------------------------------------

def test_command_writes_results_and_predictions(arithmetic_checkpoint, tmp_path):
  out = tmp_path / "eval"
  command = [sys.executable, "-m", "maxnucl.evaluate",
             "--gin_file=gin/eval/synthetic_arithmetic.gin", f"--checkpoint={arithmetic_checkpoint}",
             f"--output={out}", "--limit", "12", "--no_progress"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((out / core.RESULTS).read_text())
  assert results["benchmark"] == "synthetic_arithmetic" and results["num_examples"] == 12
  assert set(results["metrics"]) >= {"accuracy_strict", "accuracy_flexible"}
  assert results["checkpoint"] == str(arithmetic_checkpoint) and results["elapsed_s"] > 0
  assert "gsm8k.source = 'synthetic_arithmetic'" in results["gin_config"]
  records = [json.loads(l) for l in (out / core.PREDICTIONS).read_text().splitlines()]
  assert len(records) == 12
  assert set(records[0]) >= {"id", "prompt", "output", "answer_strict", "answer_flexible",
                             "reference", "correct_strict", "correct_flexible"}
  assert "accuracy_strict" in result.stdout
  assert f"synthetic_arithmetic on {arithmetic_checkpoint}" in result.stdout
  # The same command again: everything is resumed, nothing re-evaluated, same metrics.
  again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert again.returncode == 0
  rerun = json.loads((out / core.RESULTS).read_text())
  assert rerun["num_resumed"] == 12 and rerun["metrics"] == results["metrics"]


def test_command_errors_name_the_problem(arithmetic_checkpoint, tmp_path, capsys):
  assert evaluate.main(["--gin_file=gin/eval/gsm8k.gin", f"--checkpoint={tmp_path / 'none'}",
                        f"--output={tmp_path / 'o'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  gin.clear_config()
  assert evaluate.main(["--gin_file=gin/eval/gsm8k.gin", "--gin_param=gsm8k.source = 'nope'",
                        f"--checkpoint={arithmetic_checkpoint}",
                        f"--output={tmp_path / 'o'}"]) == 2
  assert "gsm8k.source = 'nope'" in capsys.readouterr().err
  gin.clear_config()


def test_training_logs_benchmark_metrics_at_eval_steps(tmp_path, offline_data):
  del offline_data
  gin.clear_config()
  train.parse_gin(["gin/demo_cpu.gin"], [
      "model_config.num_layers = 2", "train_loop.num_steps = 4", "train_loop.log_every = 1",
      "train_loop.eval_every = 0", "train_loop.progress_bar = False",
      "train_loop.checkpoint_every = 100", "train_loop.eval_tasks = ['gsm8k', 'perplexity']",
      "train_loop.eval_tasks_every = 2", "train_loop.eval_tasks_limit = 6",
      "import maxnucl.evaluation.gsm8k", "import maxnucl.evaluation.perplexity",
      "gsm8k.source = 'synthetic_arithmetic'", "gsm8k.num_shots = 0",
      "gsm8k.max_new_tokens = 8", "perplexity.seq_len = 64"])
  train.train_loop(tmp_path, mesh=sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
  gin.clear_config()
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  with_tasks = [r["step"] for r in records if "synthetic_arithmetic/accuracy_strict" in r]
  assert with_tasks == [2, 4]
  assert not [k for r in records for k in r if k.startswith("gsm8k")]  # named after the data
  assert all("perplexity/nll" in r for r in records if r["step"] in (2, 4))
  eval_dir = tmp_path / "eval" / "synthetic_arithmetic"
  assert (eval_dir / "step_4" / core.PREDICTIONS).exists()
  lines = (eval_dir / "step_2" / core.PREDICTIONS).read_text().splitlines()
  assert len(lines) == 6


def test_pruning_report_has_benchmark_metrics_before_and_after(arithmetic_checkpoint, tmp_path):
  gin.clear_config()
  gin.parse_config(["import maxnucl.evaluation.gsm8k", "gsm8k.source = 'synthetic_arithmetic'",
                    "gsm8k.num_shots = 0", "gsm8k.question_template = 'Q: {question}\\nA: '",
                    "gsm8k.max_new_tokens = 48", "gsm8k.stop_strings = ['Q:']"])
  report = prune.prune_ffn_neurons(arithmetic_checkpoint, tmp_path / "pruned", method="entropy",
                                   ratio=0.5, eval_tasks=["gsm8k"], eval_task_limit=40)
  gin.clear_config()
  entry = report["eval_tasks"]["synthetic_arithmetic"]
  assert entry["examples"] == 40
  direct = core.run_benchmark(gsm8k.GSM8K(**ARITHMETIC),
                              core.LanguageModel.load(str(arithmetic_checkpoint), "byte"), "",
                              limit=40, write_files=False, progress=False)
  assert entry["before"] == direct["metrics"]
  pruned = core.run_benchmark(gsm8k.GSM8K(**ARITHMETIC),
                              core.LanguageModel.load(str(tmp_path / "pruned"), "byte"), "",
                              limit=40, write_files=False, progress=False)
  assert entry["after"] == pruned["metrics"]
  assert checkpoints.load_config(tmp_path / "pruned").layer_ffn_widths[0] == 128


# ---- untrusted data and resume files (issue 28) -----------------------------------------------

class _ModelLoaded(BaseException):
  """Raised where the model would be loaded: nothing may get that far with bad data."""


GSM8K_FLAGS = ["--gin_file=gin/eval/gsm8k.gin", "--gin_param=gsm8k.num_shots = 2",
               "--no_progress"]


def _evaluate(argv, capsys):
  gin.clear_config()
  try:
    code = evaluate.main(list(argv))
  finally:
    gin.clear_config()
  return code, capsys.readouterr()


def _fake_model(monkeypatch):
  """LanguageModel.load gives the scripted _CountingModel (answers "#### <len % 7>")."""
  model = _CountingModel()
  monkeypatch.setattr(core.LanguageModel, "load", classmethod(lambda cls, *a, **k: model))
  return model


def _gsm8k_data(tmp_path, test_lines):
  root = tmp_path / "data"
  (root / "gsm8k").mkdir(parents=True)
  (root / "gsm8k" / "train.jsonl").write_bytes(
      (FIXTURE_DATA / "gsm8k" / "train.jsonl").read_bytes())
  (root / "gsm8k" / "test.jsonl").write_bytes(b"".join(test_lines))
  return root


FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


@pytest.mark.parametrize("bad_line, match", [
    (b'{"question": "q", "answer": 6}\n', r":2: field 'answer' = 6; expected a string"),
    (b'{"question": null, "answer": "#### 1"}\n', r":2: field 'question' = None; expected a "),
    (b'{"question": "q", "answer": "no final answer"}\n',
     r":2: field 'answer' = 'no final answer'; expected a worked solution ending in "
     r"'#### <number>'"),
    (b'\xff{"question": "q", "answer": "#### 1"}\n', r":2: not UTF-8 text"),
])
def test_bad_data_is_refused_before_the_model_is_loaded_and_nothing_is_written(
    tmp_path, tiny_checkpoint, monkeypatch, capsys, bad_line, match):
  """GSM8K "answer": 6 raised after the model had been loaded; a run refused on bad data left
  run.json and an empty predictions.jsonl behind."""
  good = (FIXTURE_DATA / "gsm8k" / "test.jsonl").read_bytes().splitlines(keepends=True)[0]
  root = _gsm8k_data(tmp_path, [good, bad_line])
  monkeypatch.setenv("MAXNUCL_DATA_DIR", str(root))

  def load(*args, **kwargs):
    raise _ModelLoaded()

  monkeypatch.setattr(core.LanguageModel, "load", classmethod(load))
  out = tmp_path / "out"
  code, printed = _evaluate(GSM8K_FLAGS + [f"--checkpoint={tiny_checkpoint}",
                                           f"--output={out}"], capsys)
  lines = printed.err.strip().splitlines()
  assert code == 2 and len(lines) == 1, printed.err
  assert re.search(re.escape(str(root / "gsm8k" / "test.jsonl")) + match, lines[0]), lines[0]
  assert not out.exists()


def _finished_gsm8k_run(tmp_path, tiny_checkpoint, monkeypatch, capsys):
  monkeypatch.setenv("MAXNUCL_DATA_DIR", str(FIXTURE_DATA))
  _fake_model(monkeypatch)
  out = tmp_path / "out"
  argv = GSM8K_FLAGS + [f"--checkpoint={tiny_checkpoint}", f"--output={out}"]
  code, printed = _evaluate(argv, capsys)
  assert code == 0, printed.err
  return out, argv


@pytest.mark.parametrize("field, value", [
    ("correct_strict", 1000), ("correct_strict", True), ("correct_flexible", "yes"),
    ("answer_strict", "999"), ("reference", "7"), ("prompt", "Question: other"),
    ("output", 12),
])
def test_a_resumed_record_that_disagrees_with_its_output_and_reference_is_refused(
    tmp_path, tiny_checkpoint, monkeypatch, capsys, field, value):
  """A record edited to "correct_strict": 1000 gave accuracy_strict 5e+04: resumed records are
  scored again from their stored output and the reference and must agree."""
  out, argv = _finished_gsm8k_run(tmp_path, tiny_checkpoint, monkeypatch, capsys)
  path = out / core.PREDICTIONS
  records = [json.loads(l) for l in path.read_text().splitlines()]
  assert records[1][field] != value
  records[1][field] = value
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  before = _folder_bytes(out)
  code, printed = _evaluate(argv, capsys)
  lines = printed.err.strip().splitlines()
  assert code == 2 and len(lines) == 1, printed.err
  assert lines[0].startswith(f"error: {path}, line 2: ") and f"'{field}'" in lines[0], lines[0]
  assert _folder_bytes(out) == before


@pytest.mark.parametrize("name, content, match", [
    (core.PREDICTIONS, b"[1, 2]\n", r"line 1: expected a JSON object, got list"),
    (core.PREDICTIONS, b"12\n", r"line 1: expected a JSON object, got int"),
    (core.PREDICTIONS, b"null\n", r"line 1: expected a JSON object, got NoneType"),
    (core.PREDICTIONS, b'{"id": 3}\n', r"line 1: field 'id' = 3; expected one of the "),
    (core.PREDICTIONS, b'{"id": "test-0"}\n', r"line 1: "),
    (core.PREDICTIONS, b'\xff\xfe{"id": "test-0"}\n', r"line 1: not UTF-8 text"),
    (core.PREDICTIONS, b'{"id": "test-0",\n{"id": "test-1"}\n', r"line 1: not valid JSON"),
    (core.RUN, b"[]", r"expected a JSON object"),
    (core.RUN, b'{"benchmark": "gsm8k", "settings": ', r"not valid JSON"),
    (core.RUN, b'\xff{}', r"not UTF-8 text"),
    (core.RUN, b'{"benchmark": "gsm8k", "settings": [], "checkpoint": "c", "limit": null}',
     r"field 'settings'"),
])
def test_malformed_resume_files_are_refused_in_one_line_naming_the_file(
    tmp_path, tiny_checkpoint, monkeypatch, capsys, name, content, match):
  """A predictions line [1,2], 12 or null, or run.json [] were tracebacks; a truncated run.json
  or non-UTF-8 bytes gave json's or the codec's message without the file."""
  out, argv = _finished_gsm8k_run(tmp_path, tiny_checkpoint, monkeypatch, capsys)
  (out / name).write_bytes(content)
  before = _folder_bytes(out)
  code, printed = _evaluate(argv, capsys)
  lines = printed.err.strip().splitlines()
  assert code == 2 and len(lines) == 1, printed.err
  assert lines[0].startswith(f"error: {out / name}") and re.search(match, lines[0]), lines[0]
  assert _folder_bytes(out) == before


def test_an_interrupted_last_line_is_redone_and_the_results_equal_a_full_run(
    tmp_path, tiny_checkpoint, monkeypatch, capsys):
  """Only a last line without its newline (a run killed while writing it) is dropped and its
  example evaluated again; the same line with its newline is refused."""
  out, argv = _finished_gsm8k_run(tmp_path, tiny_checkpoint, monkeypatch, capsys)
  finished = json.loads((out / core.RESULTS).read_text())
  path = out / core.PREDICTIONS
  lines = path.read_bytes().splitlines(keepends=True)
  path.write_bytes(lines[0] + lines[1][:20])
  code, printed = _evaluate(argv, capsys)
  resumed = json.loads((out / core.RESULTS).read_text())
  assert code == 0, printed.err
  assert resumed["metrics"] == finished["metrics"] and resumed["num_resumed"] == 1
  assert path.read_bytes() == b"".join(lines)
  path.write_bytes(lines[0] + lines[1][:20] + b"\n")
  code, printed = _evaluate(argv, capsys)
  assert code == 2 and f"{path}, line 2: not valid JSON" in printed.err


def test_a_complete_last_line_without_its_newline_is_kept_and_the_next_record_starts_a_line(
    tmp_path, tiny_checkpoint, monkeypatch, capsys):
  """A valid last record without its newline (a run killed between the record and its "\\n")
  had the next record joined onto it: the run reported 2, the file held 1 line, and every later
  run failed on that line."""
  out, argv = _finished_gsm8k_run(tmp_path, tiny_checkpoint, monkeypatch, capsys)
  finished = json.loads((out / core.RESULTS).read_text())
  path = out / core.PREDICTIONS
  lines = path.read_bytes().splitlines(keepends=True)
  path.write_bytes(lines[0].rstrip(b"\n"))
  code, printed = _evaluate(argv, capsys)
  resumed = json.loads((out / core.RESULTS).read_text())
  assert code == 0, printed.err
  assert resumed["num_resumed"] == 1 and resumed["metrics"] == finished["metrics"]
  assert path.read_bytes() == b"".join(lines)
  code, printed = _evaluate(argv, capsys)  # and the file stays readable
  assert code == 0 and json.loads((out / core.RESULTS).read_text())["num_resumed"] == 2


@pytest.mark.parametrize("flags, named", [
    (["--limit", "0"], "--limit"), (["--limit", "-3"], "--limit"),
    (["--gin_param=evaluate.limit = 0"], "evaluate.limit = 0"),
    (["--gin_param=evaluate.limit = -1"], "evaluate.limit = -1"),
])
def test_a_limit_below_one_is_refused_in_one_line(tmp_path, tiny_checkpoint, monkeypatch,
                                                   capsys, flags, named):
  """evaluate.limit = -1 evaluated all but the last example (Python's slice), 0 nothing."""
  monkeypatch.setenv("MAXNUCL_DATA_DIR", str(FIXTURE_DATA))
  _fake_model(monkeypatch)
  out = tmp_path / "out"
  try:
    code, printed = _evaluate(GSM8K_FLAGS + flags + [f"--checkpoint={tiny_checkpoint}",
                                                     f"--output={out}"], capsys)
  except SystemExit as e:  # argparse
    code, printed = e.code, capsys.readouterr()
  [message] = message_lines(printed.err.strip())
  assert code == 2 and named in message and "expected an integer >= 1" in message, printed.err
  assert not out.exists()


def test_library_limits_below_one_are_refused(tmp_path):
  for limit in (0, -1, True, 2.5):
    with pytest.raises(core.EvaluationError, match=r"limit .*expected an integer >= 1"):
      core.prepare_run(gsm8k.GSM8K(**ARITHMETIC), tmp_path / "out", limit=limit)
  assert not (tmp_path / "out").exists()


def test_a_limit_above_the_number_of_examples_says_how_many_exist(
    tmp_path, tiny_checkpoint, monkeypatch, capsys):
  monkeypatch.setenv("MAXNUCL_DATA_DIR", str(FIXTURE_DATA))
  _fake_model(monkeypatch)
  code, printed = _evaluate(GSM8K_FLAGS + ["--limit", "50", f"--checkpoint={tiny_checkpoint}",
                                           f"--output={tmp_path / 'out'}"], capsys)
  assert code == 0, printed.err
  assert "limit 50: gsm8k has 2 examples; evaluating all 2" in printed.out
  assert json.loads((tmp_path / "out" / core.RESULTS).read_text())["num_examples"] == 2
