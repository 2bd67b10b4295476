"""Optional dependencies: a command whose work needs a missing extra refuses in one line naming
the extra, before it writes anything (not an hour later in its last stage)."""

import os
import pathlib
import subprocess
import sys

import pytest

from maxnucl import dependencies
from maxnucl.reproduction import stages

REPO = pathlib.Path(__file__).resolve().parents[1]

# A sitecustomize that makes the listed top-level packages unimportable in the child process, as
# in an environment installed without their extra.
BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    return None
sys.meta_path.insert(0, _Blocked())
"""


def without(tmp_path: pathlib.Path, *packages: str) -> dict:
  """The environment of a child process in which `packages` cannot be imported."""
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(packages)))
  return dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")


def test_reproduce_without_the_hf_extra_is_refused_before_anything_is_written(tmp_path):
  output = tmp_path / "out"
  done = subprocess.run([sys.executable, str(REPO / "tools" / "reproduce.py"), "--quick",
                         "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                        env=without(tmp_path, "torch", "transformers"), timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert "export stage" in lines[0] and "torch, transformers" in lines[0]
  assert '"maxnucl[hf]"' in lines[0] and 'pip install -e ".[hf]"' in lines[0]
  assert not output.exists()


def test_only_stages_still_to_run_need_their_imports(tmp_path, monkeypatch):
  """A stage finished in the output directory is skipped by a rerun, so its imports are not
  needed; one still to run (requested, or needed by a requested one) is checked."""
  monkeypatch.setitem(stages.IMPORTS, "export", (("maxnucl_absent_package",), "a test"))
  monkeypatch.setitem(dependencies.EXTRA_OF, "maxnucl_absent_package", "hf")
  with pytest.raises(dependencies.MissingDependency, match=r"export stage .*maxnucl\[hf\]"):
    stages.check_stages(["export"], tmp_path)
  stages.check_stages(["supernodes"], tmp_path)  # does not lead to export
  (tmp_path / "stages").mkdir()
  (tmp_path / "stages" / "export.json").write_text("{}")
  stages.check_stages(list(stages.STAGES), tmp_path)


def test_with_requirements_adds_what_a_stage_needs_in_running_order():
  assert stages.with_requirements(["export"]) == ["data", "pretrain", "finetune", "prune",
                                                   "export"]
  assert stages.with_requirements(["nucl_pretrain"]) == ["data", "reallocation",
                                                          "nucl_pretrain"]


def test_lm_eval_console_script_without_the_eval_extra_is_refused_in_one_line(tmp_path):
  done = subprocess.run([sys.executable, "-m", "maxnucl.lm_eval_cli", "--model", "maxnucl",
                         "--model_args", f"checkpoint={tmp_path}", "--tasks", "arc_easy"],
                        cwd=tmp_path, capture_output=True, text=True,
                        env=without(tmp_path, "lm_eval"), timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "lm_eval" in lines[0] and '"maxnucl[eval]"' in lines[0], lines
  assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
