"""The pod rehearsal (docs/tpu.md, "Rehearsing a pod on one machine"): benchmarks/pod_rehearsal.py
--quick runs the page's commands in a bucket of the emulator, 2 processes x 4 CPU devices; each
step's effect is then read back from the bucket here, independently of the script's own checks."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

from maxnucl import checkpoints, models, outputs, paths

REPO = pathlib.Path(__file__).resolve().parents[1]


def _page_lines() -> list[str]:
  """The rehearsal block's command lines, as written in docs/tpu.md (one command a line)."""
  text = (REPO / "docs" / "tpu.md").read_text()
  block = re.search(r"<!-- pod rehearsal.*?```bash\n(.*?)```", text, re.S).group(1)
  return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _in(bucket: str, command: str, flag: str) -> str:
  """A URL the page's command names with `flag`, in the test's bucket."""
  value = re.search(rf"{flag}[= ](\S+)", command).group(1)
  return value.replace("gs://BUCKET", bucket)


def test_the_pages_pod_commands_run_in_order_and_leave_their_effects_in_the_bucket(
    gcs_server, gcs_bucket, tmp_path):
  report_file = tmp_path / "rehearsal.json"
  # one compilation cache for the steps' processes, every program kept (not only those that took
  # over a second): the restart and the evaluator load what the killed run compiled
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  done = subprocess.run([sys.executable, "benchmarks/pod_rehearsal.py", "--quick", "--bucket",
                         gcs_bucket, "--json", str(report_file)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  print(done.stdout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
  report = json.loads(report_file.read_text())
  lines = _page_lines()
  # every command of the page, in its order, each run once (the train line twice: start, restart)
  assert [step["command"] for step in report["steps"]] == lines
  assert [step["processes"] for step in report["steps"]] == [
      2 if "--process_id=I" in line else 1 for line in lines]
  convert, _, train, _, _, prune, evaluate, export = lines
  names = gcs_server.object_names(gcs_bucket)
  assert not [n for n in names if ".tmp-" in n]  # every output published, no temporaries left

  # 1. the checkpoint converted into the bucket: the tiny Gemma-2 the script wrote as HF_DIR
  converted = _in(gcs_bucket, convert, "--output")
  assert outputs.is_committed(paths.as_path(converted))
  tiny = models.get_config("gemma2_tiny")
  assert checkpoints.load_config(converted).layer_ffn_widths == (tiny.ffn_dim,) * tiny.num_layers

  # 2. trained on 2 processes, process 1 killed, its partner stopped with an error
  facts = report["facts"]
  assert facts["exits_at_kill"][1] == -9 and facts["exits_at_kill"][0] != 0
  workdir = paths.as_path(_in(gcs_bucket, train, "--workdir"))
  before = {row["step"]: row["loss"] for row in facts["logged_before_kill"]}
  resumed = facts["resumed_from"]
  assert resumed == max(facts["committed_at_kill"]) >= 2  # the last committed checkpoint
  assert sorted(before) == list(range(1, max(before) + 1)) and max(before) > 2

  # 3. restarted on both: resumed from that checkpoint, each step logged once, in order, and the
  # steps both runs took have the same losses, bit for bit (an exact restore, the same program)
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in logged] == list(range(1, 9))
  after = {row["step"]: row["loss"] for row in logged}
  assert {step: after[step] for step in before} == before
  print(f"resumed from {resumed}; steps logged by both runs: {sorted(before)}")
  committed = sorted(int(n.split("/")[3]) for n in names
                     if re.fullmatch(r"runs/tiny/checkpoints/\d+/" + outputs.COMMIT_MARKER, n))
  assert committed == [4, 6, 8]  # train_loop.keep_checkpoints = 3 of every 2nd step

  # 4. evaluated in the loop at the last step: results in the bucket, metrics in metrics.jsonl
  for bench in ("synthetic_arithmetic", "perplexity"):
    results = json.loads((workdir / "eval" / bench / "step_8" / "results.json").read_text())
    assert results["num_examples"] == 4  # train_loop.eval_tasks_limit
  assert "perplexity/nll" in logged[-1] and "synthetic_arithmetic/accuracy_strict" in logged[-1]

  # 5. pruned from the bucket into the bucket: 25 % of each layer's 256 neurons removed
  pruned = _in(gcs_bucket, prune, "--output")
  assert _in(gcs_bucket, prune, "--input") == f"{workdir}/checkpoints/8"
  assert checkpoints.load_config(pruned).layer_ffn_widths == (192,) * tiny.num_layers

  # 6. the pruned model evaluated on 2 processes into the bucket
  result_dir = paths.as_path(_in(gcs_bucket, evaluate, "--output"))
  assert outputs.is_committed(result_dir)
  results = json.loads((result_dir / "results.json").read_text())
  assert results["num_examples"] == 16  # --limit 16
  assert math.isfinite(results["metrics"]["nll"]) and results["metrics"]["nll"] > 0

  # 7. exported from the bucket to Hugging Face in the bucket, at the pruned width
  hf_dir = paths.as_path(_in(gcs_bucket, export, "--output"))
  config = json.loads((hf_dir / "config.json").read_text())
  assert (config["intermediate_size"], config["num_hidden_layers"]) == (192, tiny.num_layers)
  assert (hf_dir / "model.safetensors").exists() and outputs.is_committed(hf_dir)
