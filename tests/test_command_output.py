"""What the command lines print while they work: every compilation is announced before it starts
and timed after it ends, before the first step or result; the trainer and the evaluator say
which tokens their held-out NLL scores (and score the same ones); the demo opens with no
warning."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import processes
from maxnucl import compilation, decoding, models

COMPILED = re.compile(r"^compiled in \d+\.\d s$")


def _run(args, timeout=600):
  """A command line as a user runs it (one CPU device, no TensorFlow log level set), stdout and
  stderr as one stream in the order written."""
  env = {k: v for k, v in processes.cpu_env(1).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  done = subprocess.run([sys.executable, *args], cwd=processes.REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:]
  # progress bars redraw with carriage returns: each redraw is a line of its own
  return [line for line in re.split(r"[\r\n]", done.stdout) if line.strip()]


def _announced(lines, what):
  """Index of the line after the announcement of `what`, which must state the time taken."""
  start = lines.index(f"compiling {what}…")
  assert COMPILED.match(lines[start + 1]), lines[start:start + 2]
  return start + 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The README's demo command, shortened to 10 steps with a held-out evaluation at the end."""
  workdir = tmp_path_factory.mktemp("demo") / "run"
  lines = _run(["-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin", f"--workdir={workdir}",
                "--gin_param=train_loop.num_steps = 10", "--gin_param=train_loop.eval_every = 10"])
  return workdir, lines


def test_demo_announces_its_compilations_before_the_first_step(demo):
  _, lines = demo
  first_bar = next(i for i, line in enumerate(lines) if line.startswith("train:"))
  assert _announced(lines, "the train step (gemma2_tiny, batch 16×64)") < first_bar
  assert _announced(lines, "the eval step (gemma2_tiny, batch 16×64)") < first_bar


def test_demo_opens_without_a_warning(demo):
  _, lines = demo
  opening = lines[:6]
  assert lines[0] == "compiling the train step (gemma2_tiny, batch 16×64)…", opening
  assert not [line for line in opening if re.search("warn|tensorflow|absl", line, re.I)], opening


def test_trainer_and_evaluator_score_the_same_tokens_and_agree_on_the_nll(demo):
  workdir, train_lines = demo
  scored = "NLL over target tokens only (inputs not scored)"
  assert f"eval_loss: {scored}, 4 batches of synthetic_arithmetic test" in train_lines
  eval_loss = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
  # The trainer's data: the first 4 batches of 16 rows of 64 tokens of the test split; the
  # perplexity benchmark's default tokens (no loss_on_inputs binding).
  lines = _run(["-m", "maxnucl.evaluate", "--gin_file=gin/eval/perplexity.gin",
                f"--checkpoint={workdir}", f"--output={workdir / 'perplexity'}",
                "--gin_param=perplexity.split = 'test'", "--gin_param=perplexity.seq_len = 64",
                "--limit", "64", "--batch_size", "16", "--no_progress"])
  # which vocabulary: the one the demo's run recorded (its workdir's operative config)
  assert lines[0] == f"vocabulary: byte (recorded in {workdir / 'operative_config.gin'})"
  assert lines[1] == f"perplexity: {scored} of synthetic_arithmetic test, rows of 64 tokens"
  results_line = next(i for i, l in enumerate(lines) if l.startswith("perplexity on "))
  assert _announced(lines, "the NLL step (gemma2_tiny, batch 16×64)") < results_line
  metrics = json.loads((workdir / "perplexity" / "results.json").read_text())["metrics"]
  # Both sum the same per-token float32 NLLs l_i >= 0 (the same `row_nll`, in two compiled
  # programs) in different orders: the trainer adds a batch's 16 row sums in float32, the
  # evaluator adds rows in float64.  A float32 sum of N terms is within (N - 1) * eps * sum|l_i|
  # = (N - 1) * eps * N * NLL of the exact one (eps = float32's 2^-23), so the two means, over
  # the same N tokens, differ by at most 2 * N * eps * NLL.
  tokens = metrics["tokens"]
  assert metrics["nll"] == pytest.approx(
      eval_loss, rel=2 * tokens * float(np.finfo(np.float32).eps), abs=0)


def test_evaluator_announces_prefill_and_decoding_before_its_results(demo):
  workdir, _ = demo
  lines = _run(["-m", "maxnucl.evaluate", "--gin_file=gin/eval/synthetic_arithmetic.gin",
                f"--checkpoint={workdir}", f"--output={workdir / 'arithmetic'}", "--limit", "4",
                "--batch_size", "4", "--no_progress"])
  results_line = lines.index(next(l for l in lines if l.startswith("synthetic_arithmetic on ")))
  assert _announced(lines, "prefill (gemma2_tiny, batch 4×128)") < results_line
  assert _announced(lines, "decoding (gemma2_tiny, batch 4, up to 64 new tokens)") < results_line


def test_generate_announces_its_compilations_before_the_text(demo):
  workdir, _ = demo
  lines = _run(["-m", "maxnucl.generate", "--checkpoint", str(workdir), "--prompt",
                "Q: Eli has 53 coins, gets 5 more. How many now?\nA: ", "--max_new_tokens", "8",
                "--no_stop_at_eos"])
  assert lines[0] == f"vocabulary: byte (recorded in {workdir / 'operative_config.gin'})"
  assert lines[1] == "compiling prefill (gemma2_tiny, batch 1×64)…" and COMPILED.match(lines[2])
  assert (lines[3] == "compiling decoding (gemma2_tiny, batch 1, up to 8 new tokens)…"
          and COMPILED.match(lines[4]))
  assert not [line for line in lines[5:] if line.startswith("compil")]  # then only the text


def test_scoring_is_announced_once_per_shape(capsys):
  cfg = models.get_config("gemma2_tiny", num_layers=1).replace(name="announced_scoring")
  params = models.init(cfg, jax.random.PRNGKey(0))
  decoding.score(cfg, params, [[2, 5, 6]], [[7, 8]])
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "compiling scoring (announced_scoring, batch 1×8)…"
  assert COMPILED.match(err[1]) and len(err) == 2
  decoding.score(cfg, params, [[2, 9, 6]], [[7, 3]])  # the same shapes: nothing to compile
  assert capsys.readouterr().err == ""


def test_announcements_come_from_process_zero_only(monkeypatch, capsys):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  compilation.announce("compiling something…")
  assert capsys.readouterr().err == ""
