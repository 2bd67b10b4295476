"""Every console script refuses bad input the same way: exit status 2, a one-line message naming
what is wrong, and nothing new on disk (README: "nothing is created or modified").

Each case runs the installed console script (setup.py's entry points) from an empty working
directory, with its input and output paths in an empty temporary directory; afterwards both
trees must be as they were.  The `tools/*.py` scripts are not run again here: they are two-line
wrappers calling the same mains (tests/test_packaging.py checks that they stay so).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from cli_messages import message_lines

BIN = pathlib.Path(sys.executable).parent  # where `pip install -e .` put the console scripts
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")

# (console script, arguments, what the message names); OUT is the temporary directory.
CASES = [
    ("maxnucl-train", ["--gin_file=gin/demo_cpu.gin", "--gin_param=train_loop.num_steps = 'five'",
                       "--workdir=OUT/run"], "train_loop.num_steps = 'five'"),
    ("maxnucl-train", ["--gin_file=gin/demo_cpu.gin", "--gin_param=create_mesh.shape = (1, -1",
                       "--workdir=OUT/run"], "create_mesh.shape = (1, -1"),
    ("maxnucl-train", ["--gin_file=gin/demo_cpu.gin",
                       "--gin_param=train_loop.init_checkpoint = 'OUT/missing'",
                       "--workdir=OUT/run"], "OUT/missing"),
    ("maxnucl-evaluate", ["--gin_file=gin/eval/synthetic_arithmetic.gin",
                          "--checkpoint=OUT/missing", "--output=OUT/eval"], "OUT/missing"),
    ("maxnucl-evaluate", ["--gin_file=gin/eval/synthetic_arithmetic.gin",
                          "--gin_param=no_such_benchmark.num_shots = 1",
                          "--checkpoint=OUT/missing", "--output=OUT/eval"], "no_such_benchmark"),
    ("maxnucl-evaluate", ["--gin_file=gin/eval/synthetic_arithmetic.gin", "--limit=0",
                          "--checkpoint=OUT/missing", "--output=OUT/eval"], "--limit"),
    ("maxnucl-generate", ["--checkpoint", "OUT/missing", "--prompt", "Q: 1 + 1?"], "OUT/missing"),
    ("maxnucl-generate", ["--checkpoint", "OUT/missing", "--prompt_file", "OUT/no_prompt.txt"],
     "--prompt_file OUT/no_prompt.txt"),
    ("maxnucl-summary", ["gemma2_nine"], "gemma2_nine"),
    ("maxnucl-data", ["cache", "--source=no_such_task", "--split=test", "--cache_dir=OUT/cache",
                      "--seq_len=64"], "no_such_task"),
    ("maxnucl-data", ["cache", "--source=gsm8k", "--split=test", "--cache_dir=OUT/cache",
                      "--seq_len=64"], "gsm8k/test.jsonl"),  # no data: a multi-line message
    ("maxnucl-data", ["train_sentencepiece", "--output", "OUT/new/sp", "--vocab_size", "262",
                      "OUT/corpus.txt"], "vocab_size 262"),
    ("maxnucl-convert", ["hf-to-maxnucl", "--input", "OUT/missing", "--output", "OUT/ckpt"],
     "OUT/missing"),
    ("maxnucl-prune", ["--input", "OUT/missing", "--output", "OUT/pruned", "--method", "entropy",
                       "--ratio", "0.25", "--report", "OUT/report.json"], "OUT/missing"),
    # --eval_task_limit -1 evaluated all but the last example, and only after the pruning
    ("maxnucl-prune", ["--input", "OUT/missing", "--output", "OUT/pruned", "--method", "entropy",
                       "--ratio", "0.25", "--eval_task", "gsm8k", "--eval_task_limit", "-1"],
     "--eval_task_limit -1; expected an integer >= 1"),
    ("maxnucl-analyze", ["--input", "OUT/missing", "--output_dir", "OUT/analysis"],
     "OUT/missing"),
    ("maxnucl-lm-eval", ["--model", "maxnucl", "--model_args", "checkpoint=OUT/missing",
                         "--tasks", "arc_easy", "--output_path", "OUT/lm_eval"], "OUT/missing"),
    ("maxnucl-tpu-vm", ["setup", "--name", "nucl", "--zone", "us-west4-a", "--project",
                        "my-project", "--source", "OUT/missing"], "OUT/missing"),
    ("maxnucl-tpu-vm", ["train", "--name", "nucl", "--zone", "us-west4-a", "--project",
                        "my-project", "--", "--gin_file=gin/demo_cpu.gin", "--dry_run"],
     "--dry_run"),
    ("maxnucl-reproduce", ["--output", "OUT/repro", "--stages", "no_such_stage"],
     "no_such_stage"),
]
CONSOLE_SCRIPTS = ["maxnucl-train", "maxnucl-evaluate", "maxnucl-generate", "maxnucl-summary",
                   "maxnucl-data", "maxnucl-convert", "maxnucl-prune", "maxnucl-analyze",
                   "maxnucl-lm-eval", "maxnucl-tpu-vm", "maxnucl-reproduce"]


def _entries(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_every_console_script_has_a_bad_input_case():
  setup_py = (pathlib.Path(__file__).resolve().parent.parent / "setup.py").read_text()
  assert all(f'"{script} = ' in setup_py for script in CONSOLE_SCRIPTS)
  assert {script for script, _, _ in CASES} == set(CONSOLE_SCRIPTS)


@pytest.mark.parametrize("script,args,named", CASES,
                         ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(CASES)])
def test_bad_input_exits_2_in_one_line_and_leaves_nothing_behind(script, args, named, tmp_path):
  out, cwd, data = tmp_path / "out", tmp_path / "cwd", tmp_path / "data"
  for directory in (out, cwd, data):
    directory.mkdir()
  (out / "corpus.txt").write_text("Ada has 3 apples and gets 4 more.\n")
  before = _entries(tmp_path)
  proc = subprocess.run([str(BIN / script), *(a.replace("OUT", str(out)) for a in args)],
                        cwd=cwd, env=dict(ENV, MAXNUCL_DATA_DIR=str(data)), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  [message] = message_lines(proc.stderr)
  assert named.replace("OUT", str(out)) in message
  assert _entries(tmp_path) == before
