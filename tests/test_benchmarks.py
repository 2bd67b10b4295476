"""The benchmarks leave nothing behind in their work directory unless --keep (tiny presets)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

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
