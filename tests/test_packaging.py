"""The installed package: gin files found from any working directory, shipped in the wheel, and
the command lines installed as console scripts beside their `python -m` / `tools/*.py` forms."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
GIN_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin").rglob("*.gin"))
CONSOLE_SCRIPTS = ["maxnucl-train", "maxnucl-evaluate", "maxnucl-generate", "maxnucl-summary",
                   "maxnucl-data", "maxnucl-convert", "maxnucl-prune", "maxnucl-analyze",
                   "maxnucl-lm-eval", "maxnucl-tpu-vm", "maxnucl-reproduce"]
TOOLS = ["convert_checkpoint.py", "prune_checkpoint.py", "analyze_ffn.py", "cache_tasks.py",
         "train_sentencepiece.py", "tpu_vm.py", "reproduce.py"]
# One CPU device, as a user's shell has (conftest simulates 8 for the mesh tests).
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")


def _run(args, cwd, env=ENV, timeout=300):
  return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def elsewhere(tmp_path):
  """A working directory outside the repository."""
  directory = tmp_path / "elsewhere"
  directory.mkdir()
  return directory


# ---- gin files from any working directory ----------------------------------------------------------

def test_train_cli_resolves_gin_includes_outside_the_repository(elsewhere):
  proc = _run([sys.executable, "-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin",
               "--gin_param=train_loop.num_steps = 2", "--gin_param=train_loop.eval_every = 0",
               "--gin_param=train_loop.progress_bar = False", f"--workdir={elsewhere / 'run'}"],
              cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr
  assert "Path not found" not in proc.stderr, proc.stderr
  assert "finished at step 2" in proc.stdout


def test_summary_cli_resolves_gin_files_outside_the_repository(elsewhere):
  proc = _run([sys.executable, "-m", "maxnucl.summary",
               "--gin_file=gin/models/gemma2_tiny.gin"], cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr
  assert "Path not found" not in proc.stderr, proc.stderr
  assert proc.stdout.startswith("model gemma2_tiny")


def test_data_cache_cli_resolves_gin_files_outside_the_repository(elsewhere):
  proc = _run([sys.executable, "-m", "maxnucl.data", "cache", "--source=synthetic_arithmetic",
               "--split=test", f"--cache_dir={elsewhere / 'cache'}", "--seq_len=64",
               "--gin_file=gin/data/synthetic.gin"], cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr
  assert "Path not found" not in proc.stderr, proc.stderr
  assert (elsewhere / "cache" / "synthetic_arithmetic" / "test").is_dir()


def test_a_gin_file_in_no_search_path_is_refused_naming_it(elsewhere):
  proc = _run([sys.executable, "-m", "maxnucl.summary", "--gin_file=gin/models/gemma2_huge.gin"],
              cwd=elsewhere)
  assert proc.returncode == 2
  assert "gin/models/gemma2_huge.gin does not exist" in proc.stderr, proc.stderr


def test_wheel_ships_the_gin_files_and_the_console_scripts(tmp_path, elsewhere):
  """Built from a copy of the sources (nothing written into the checkout) and only unpacked,
  not installed: its maxnucl finds the gin files inside itself from any working directory."""
  pytest.importorskip("setuptools")
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.py", "README.md", "requirements.txt", "MANIFEST.in"):
    shutil.copy(REPO / name, source / name)
  for name in ("maxnucl", "gin"):
    shutil.copytree(REPO / name, source / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
  built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-q", "-w", tmp_path / "dist", source], cwd=tmp_path)
  assert built.returncode == 0, built.stdout + built.stderr
  [wheel] = (tmp_path / "dist").glob("maxnucl-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = archive.read(entry_points).decode()
  assert {f"maxnucl/{path}" for path in GIN_FILES} <= names
  assert all(f"{script} = " in scripts for script in CONSOLE_SCRIPTS), scripts

  unpacked = tmp_path / "unpacked"
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(unpacked)
  proc = _run([sys.executable, "-c",
               "from maxnucl import gin_config; print(gin_config.GIN_SEARCH_PATH); "
               "gin_config.parse(['gin/demo_cpu.gin'], [])"],
              cwd=elsewhere, env=dict(ENV, PYTHONPATH=str(unpacked)))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(unpacked / "maxnucl")
  assert "Path not found" not in proc.stderr, proc.stderr


# ---- command lines ---------------------------------------------------------------------------------

def _help_of_all(commands, cwd):
  """Run every `command --help` at once; {name: CompletedProcess-like (returncode, output)}."""
  running = {name: subprocess.Popen([*map(str, command), "--help"], cwd=cwd, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, command in commands.items()}
  return {name: (p.wait(timeout=300), p.stdout.read()) for name, p in running.items()}


def test_console_scripts_are_installed_and_answer_help(elsewhere):
  bin_dir = pathlib.Path(sys.executable).parent  # `pip install -e ".[test]"` put them here
  missing = [name for name in CONSOLE_SCRIPTS if not (bin_dir / name).is_file()]
  assert missing == [], f"not installed (pip install -e . again?): {missing}"
  results = _help_of_all({name: [bin_dir / name] for name in CONSOLE_SCRIPTS}, cwd=elsewhere)
  failed = {name: output[-2000:] for name, (code, output) in results.items() if code != 0}
  assert failed == {}
  assert all("usage:" in output for _, output in results.values())


def test_tools_scripts_are_thin_wrappers_that_answer_help(elsewhere):
  for tool in TOOLS:
    text = (REPO / "tools" / tool).read_text()
    assert "sys.path" not in text and len(text.splitlines()) <= 16, tool
  results = _help_of_all({tool: [sys.executable, REPO / "tools" / tool] for tool in TOOLS},
                         cwd=elsewhere)
  failed = {name: output[-2000:] for name, (code, output) in results.items() if code != 0}
  assert failed == {}
  assert "usage: convert_checkpoint.py" in results["convert_checkpoint.py"][1]
  assert "usage: prune_checkpoint.py" in results["prune_checkpoint.py"][1]
