"""Every converter, pruner and analysis command that reads a maxnucl checkpoint also takes a
training workdir, meaning its latest step (`checkpoints.resolve`), as generate, evaluate and the
lm-eval adapter do: the result equals that of the step given directly."""

import json

import jax
import numpy as np
import pytest

from maxnucl import checkpoints
from maxnucl.conversion import cli as convert_cli
from maxnucl.pruning import cli as pruning_cli


@pytest.fixture(scope="module")
def workdir(arithmetic_checkpoint):
  """The README demo's workdir: steps 100, 200, 300."""
  root = arithmetic_checkpoint.parents[1]
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["100", "200", "300"]
  assert checkpoints.resolve(root) == arithmetic_checkpoint
  return root


def _same_tree(a, b):
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_maxnucl_to_hf_takes_a_workdir(workdir, arithmetic_checkpoint, tmp_path):
  for name, source in (("from_workdir", workdir), ("from_step", arithmetic_checkpoint)):
    assert convert_cli.main(["maxnucl-to-hf", "--input", str(source), "--output",
                             str(tmp_path / name), "--vocab", "byte"]) == 0
  assert _same_tree(tmp_path / "from_workdir", tmp_path / "from_step")


def test_inspect_takes_a_workdir(workdir, arithmetic_checkpoint, capsys):
  summaries = []
  for source in (workdir, arithmetic_checkpoint):
    assert convert_cli.main(["inspect", str(source), "--json"]) == 0
    summaries.append(json.loads(capsys.readouterr().out))
  assert summaries[0] == summaries[1]
  assert summaries[0]["path"] == str(arithmetic_checkpoint)


def test_prune_takes_a_workdir(workdir, arithmetic_checkpoint, tmp_path, capsys):
  reports = []
  for name, source in (("from_workdir", workdir), ("from_step", arithmetic_checkpoint)):
    assert pruning_cli.prune_main(["--input", str(source), "--output", str(tmp_path / name),
                                   "--method", "entropy", "--ratio", "0.25",
                                   "--report", str(tmp_path / f"{name}.json")]) == 0
    reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
  capsys.readouterr()
  assert reports[0]["input"] == reports[1]["input"] == str(arithmetic_checkpoint)
  assert reports[0]["layers"] == reports[1]["layers"]  # the same neurons removed
  (cfg_a, params_a), (cfg_b, params_b) = (checkpoints.load(tmp_path / name)
                                          for name in ("from_workdir", "from_step"))
  assert cfg_a == cfg_b
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


def test_analyze_takes_a_workdir(workdir, arithmetic_checkpoint, tmp_path, capsys):
  results = []
  for name, source in (("from_workdir", workdir), ("from_step", arithmetic_checkpoint)):
    assert pruning_cli.analyze_main(["--input", str(source), "--output_dir",
                                     str(tmp_path / name), "--methods", "entropy,magnitude"]) == 0
    results.append(json.loads((tmp_path / name / "analysis.json").read_text()))
  capsys.readouterr()
  assert results[0] == results[1]
  assert results[0]["input"] == str(arithmetic_checkpoint)


def test_an_output_inside_the_workdir_is_refused(workdir, capsys):
  """A workdir is the input as a whole: nothing is written into it."""
  before = sorted(p.name for p in workdir.iterdir())
  assert convert_cli.main(["maxnucl-to-hf", "--input", str(workdir), "--output",
                           str(workdir / "hf")]) == 2
  assert f"lies inside the input checkpoint {workdir}" in capsys.readouterr().err
  assert pruning_cli.prune_main(["--input", str(workdir), "--output", str(workdir / "pruned"),
                                 "--method", "entropy", "--ratio", "0.25"]) == 2
  assert f"lies inside the input checkpoint {workdir}" in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == before
