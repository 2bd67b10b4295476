"""The benchmarks refuse bad arguments in one line before any work, and leave nothing behind in
their work directory unless --keep (tiny presets)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from cli_messages import message_lines

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")


def _benchmark(script, *args, cwd):
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)],
                        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _workdirs_module():
  spec = importlib.util.spec_from_file_location("benchmark_workdirs",
                                                REPO / "benchmarks" / "workdirs.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# One bad argument for every benchmark script, and what its message must name (the cases after
# a `#` gave a traceback before).
BAD_ARGUMENTS = {
    "attention_check.py": (["--repeats", "0"], "--repeats"),  # median of no times
    "attention_memory.py": (["--kv_heads", "3"], "--kv_heads 3"),  # 2 query heads
    "compile_time.py": (["--deep", "0"], "--deep"),
    "convert_benchmark.py": (["--layers", "1"], "--layers"),  # its check reads layer 1
    "decode_throughput.py": (["--preset", "gemma2_nine"], "'gemma2_nine'"),
    "demo_figures.py": (["--docs", "no_such_page.md"], "no_such_page.md"),
    "eval_throughput.py": (["--checkpoint", "no_such_checkpoint"], "no_such_checkpoint"),
    "nucl_overhead.py": (["--remat", "sometimes"], "'sometimes'"),
    "prune_benchmark.py": (["--preset", "gemma2_nine"], "'gemma2_nine'"),
    "sandbox_overhead.py": (["--runs", "0", "--warmup", "0"], "--runs"),
    "tpu_plan.py": (["--runs=no_such_run.gin"], "no_such_run.gin"),
    "train_throughput.py": (["--overrides", "[2]"], "--overrides '[2]'"),  # not a JSON object
    "gpu_session.sh": (["c"], "a|b|smoke"),  # not a part
    "gguf_conversion.py": (["--runs", "0"], "--runs"),
    "smollm2_speed.py": (["--gguf", "x.gguf", "--new_tokens", "1"], "--new_tokens"),
    "real_model_quickstart.py": (["--json", "/nonexistent/dir/x.json"], "--json"),
    "humaneval_sandbox.py": (["--workers", "0"], "--workers"),
    "checkpoint_checksum.py": (["--repeats", "0"], "--repeats"),
    "pod_rehearsal.py": (["--bucket", "gs://b/run"], "--bucket"),  # a bucket, not a path in one
    "recover_step.py": (["--study", "no_such_study"], "no_such_study"),
}
HELPERS = {"workdirs.py", "arguments.py"}  # imported by the scripts, not run


def test_every_benchmark_script_has_a_bad_argument_case():
  scripts = {p.name for p in (REPO / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
  assert scripts - HELPERS == set(BAD_ARGUMENTS)


@pytest.mark.parametrize("script", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_is_refused_in_one_line_before_any_work(script, tmp_path):
  runner = ["bash"] if script.endswith(".sh") else [sys.executable]
  workdir = tmp_path / "work"
  args, named = BAD_ARGUMENTS[script]
  if script in ("convert_benchmark.py", "prune_benchmark.py"):
    args = [*args, "--workdir", str(workdir)]
  proc = subprocess.run([*runner, str(REPO / "benchmarks" / script), *args], cwd=tmp_path,
                        env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  [message] = message_lines(proc.stderr)
  assert named in message
  assert list(tmp_path.iterdir()) == []  # neither --workdir nor anything else was made


def test_prune_benchmark_removes_its_workdir_unless_keep(tmp_path):
  work = tmp_path / "prune_bench"
  tiny = ["--preset", "gemma2_tiny", "--layers", 2, "--vocab_size", 384, "--workdir", work]
  kept = _benchmark("prune_benchmark.py", *tiny, "--keep", cwd=tmp_path)
  assert "created" in kept.stderr
  assert {p.name for p in work.iterdir()} == {"ckpt_gemma2_tiny_streaming", "pruned",
                                              "report.json"}
  again = _benchmark("prune_benchmark.py", *tiny, cwd=tmp_path)
  assert "created" not in again.stderr  # the kept input was reused
  assert '"ffn_widths_after": [\n  192,\n  192\n ]' in again.stdout
  assert not work.exists()


def test_convert_benchmark_removes_what_it_wrote_and_nothing_else(tmp_path):
  work = tmp_path / "convert_bench"
  work.mkdir()
  (work / "notes.txt").write_text("the user's")
  _benchmark("convert_benchmark.py", "--preset", "gemma2_tiny", "--layers", 2, "--shard_gib",
             0.0001, "--workdir", work, cwd=tmp_path)
  assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_scratch_removes_the_run_outputs_after_an_error(tmp_path):
  workdirs = _workdirs_module()
  work = tmp_path / "bench"
  with pytest.raises(RuntimeError):
    with workdirs.scratch(work, ["ckpt", ".ckpt.tmp-*", "report.json"], keep=False) as w:
      (w / "ckpt").mkdir()
      (w / "ckpt" / "array").write_bytes(b"0" * 1024)
      (w / ".ckpt.tmp-1234").mkdir()
      raise RuntimeError("interrupted")
  assert not work.exists()


def test_scratch_keeps_other_files_and_the_run_outputs_with_keep(tmp_path):
  workdirs = _workdirs_module()
  work = tmp_path / "bench"
  work.mkdir()
  (work / "mine.json").write_text("{}")
  with workdirs.scratch(work, ["ckpt"], keep=True) as w:
    (w / "ckpt").mkdir()
  assert sorted(p.name for p in work.iterdir()) == ["ckpt", "mine.json"]
  with workdirs.scratch(work, ["ckpt"], keep=False):
    pass
  assert [p.name for p in work.iterdir()] == ["mine.json"]
