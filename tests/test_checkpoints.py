"""maxnucl checkpoints: self-describing, exact, sharded restore, and safe failure modes."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from maxnucl import checkpoints, models, outputs, sharding

REPO = pathlib.Path(__file__).absolute().parents[1]


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
              for x, y in zip(leaves_a, leaves_b)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 0, 96, 32), param_dtype="bfloat16")
  params = models.init(cfg, jax.random.PRNGKey(0))
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoints.save(path, cfg, params)
  return cfg, params, path


def test_round_trip_is_bit_exact_and_describes_itself(saved):
  cfg, params, path = saved
  loaded_cfg, loaded = checkpoints.load(path)
  assert loaded_cfg == cfg and loaded_cfg.layer_ffn_widths == (256, 0, 96, 32)
  assert _tree_equal(params, loaded)


def test_stored_arrays_lists_shapes_and_dtypes_without_loading(saved):
  cfg, _, path = saved
  stored = checkpoints.stored_arrays(path)
  assert stored[("layers_2", "mlp", "out")] == ((96, cfg.d_model), "bfloat16")
  assert ("layers_1", "mlp", "out") not in stored


def test_load_with_dtype_casts(saved):
  _, params, path = saved
  _, loaded = checkpoints.load(path, dtype="float32")
  leaf = loaded["layers_0"]["mlp"]["out"]
  assert leaf.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(leaf),
                                np.asarray(params["layers_0"]["mlp"]["out"], np.float32))


def test_restore_places_each_array_in_its_sharding(saved):
  cfg, params, path = saved
  mesh = sharding.create_mesh((2, 2, 2))
  _, loaded = checkpoints.load(path, mesh=mesh, rules=sharding.DEFAULT_RULES)
  axes = models.logical_axes(cfg)
  expected = sharding.tree_shardings(axes, params, mesh, sharding.DEFAULT_RULES)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(
      expected, is_leaf=lambda x: isinstance(x, NamedSharding))):
    assert got.sharding == want
  assert loaded["layers_0"]["mlp"]["gate"].sharding.spec == PartitionSpec("fsdp", "tensor")
  assert _tree_equal(params, loaded)


def _checksums(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


def test_refuses_to_overwrite_without_flag_and_leaves_existing_untouched(saved):
  cfg, params, path = saved
  before = _checksums(path)
  with pytest.raises(FileExistsError, match="overwrite"):
    checkpoints.save(path, cfg, params)
  assert _checksums(path) == before


def test_overwrite_replaces(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=1)
  first = models.init(cfg, jax.random.PRNGKey(0))
  second = models.init(cfg, jax.random.PRNGKey(1))
  checkpoints.save(tmp_path / "c", cfg, first)
  checkpoints.save(tmp_path / "c", cfg, second, overwrite=True)
  assert _tree_equal(checkpoints.load(tmp_path / "c")[1], second)


def test_missing_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoints.load(tmp_path / "nowhere")


def test_directory_without_config_is_not_a_checkpoint(tmp_path):
  (tmp_path / "params").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="model_config"):
    checkpoints.load(tmp_path)


def test_params_that_disagree_with_config_are_refused_naming_the_tensor(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(0))
  params["layers_1"]["mlp"]["out"] = params["layers_1"]["mlp"]["out"][:10]
  with pytest.raises(checkpoints.CheckpointError, match="layers_1/mlp/out.*shape"):
    checkpoints.save(tmp_path / "bad", cfg, params)
  del params["layers_1"]["mlp"]
  with pytest.raises(checkpoints.CheckpointError, match="layers_1/mlp/gate.*missing"):
    checkpoints.save(tmp_path / "bad", cfg, params)
  assert not (tmp_path / "bad").exists()


def test_checkpoint_whose_config_disagrees_with_arrays_is_refused(saved, tmp_path):
  """A checkpoint written for one layer layout cannot be silently read as another."""
  cfg, params, _ = saved
  other = cfg.replace(ffn_widths=(256, 0, 96, 33))
  with pytest.raises(checkpoints.CheckpointError, match="layers_3/mlp"):
    checkpoints.save(tmp_path / "mismatch", other, params)


# ---- output paths and temporary directories (maxnucl.outputs) ---------------------------------

def _tree(path: pathlib.Path, files=("a.bin",)) -> pathlib.Path:
  path.mkdir(parents=True)
  for name in files:
    (path / name).write_text(name)
  return path


def test_output_that_is_inside_or_contains_an_input_is_refused_symlinks_resolved(tmp_path):
  real = _tree(tmp_path / "real" / "in")
  (tmp_path / "alias").symlink_to(tmp_path / "real")  # the input through a symlinked parent
  (tmp_path / "link").symlink_to(real)  # a symlink to the input itself
  refused = {real: "is", tmp_path / "link": "is", tmp_path / "alias" / "in": "is",
             real / "sub": "lies inside", tmp_path / "link" / "sub": "lies inside",
             tmp_path / "alias" / "in" / "sub": "lies inside",
             tmp_path / "real": "contains", tmp_path: "contains"}
  for source in (real, tmp_path / "alias" / "in", tmp_path / "link"):
    for output, relation in refused.items():
      with pytest.raises(outputs.OutputPathError) as error:
        outputs.check_output_path(output, {"input checkpoint": source}, overwrite=True)
      assert f"--output {output}" in str(error.value), str(error.value)
      assert f"{relation} the input checkpoint {source}" in str(error.value), str(error.value)
  assert outputs.check_output_path(tmp_path / "other", {"input": real}) == tmp_path / "other"
  # a directory that is written into (not replaced as a whole) may hold the input
  assert outputs.check_output_path(tmp_path, {"input": real}, overwrite=None, replaces=False)
  (tmp_path / "file").write_text("x")
  with pytest.raises(outputs.OutputPathError, match="file is not a directory"):
    outputs.check_output_path(tmp_path / "file" / "out", {})
  assert [p.name for p in real.iterdir()] == ["a.bin"]


def test_output_file_needs_an_existing_directory_and_is_never_an_input(tmp_path):
  report = tmp_path / "missing" / "report.json"
  with pytest.raises(outputs.OutputPathError) as error:
    outputs.check_output_file(report, {}, flag="--report")
  assert str(error.value) == (f"--report {report}: directory {report.parent} does not exist")
  source = _tree(tmp_path / "in")
  with pytest.raises(outputs.OutputPathError, match="lies inside the input"):
    outputs.check_output_file(source / "report.json", {"input": source}, flag="--report")
  with pytest.raises(outputs.OutputPathError, match="is a directory"):
    outputs.check_output_file(source, {}, flag="--report")
  assert not report.parent.exists() and [p.name for p in source.iterdir()] == ["a.bin"]


_WATCH = """
import os, sys
final, stop = sys.argv[1], sys.argv[2]
print("watching", flush=True)
missing = checks = 0
while not os.path.exists(stop):
  checks += 1
  missing += not os.path.exists(final)
print(missing, checks)
"""


def test_overwrite_swaps_in_one_step_so_the_output_name_never_goes_missing(tmp_path,
                                                                            monkeypatch):
  final = _tree(tmp_path / "out", ["version"])
  renamed_away, rename = [], os.rename

  def spy(src, dst, *args, **kwargs):  # the final name is never renamed out of the way
    if os.fspath(src) == os.fspath(final):
      renamed_away.append(dst)
    return rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", spy)
  # another process (no shared interpreter lock) checks the final name in a tight loop
  stop = tmp_path.parent / f"{tmp_path.name}.stop"
  watcher = subprocess.Popen([sys.executable, "-c", _WATCH, str(final), str(stop)],
                             stdout=subprocess.PIPE, text=True)
  try:
    assert watcher.stdout.readline() == "watching\n"
    swaps, start = 0, time.monotonic()
    while swaps < 100 or time.monotonic() - start < 1.0:
      with outputs.TemporaryOutput(final, overwrite=True) as tmp:
        (tmp / "version").write_text(str(swaps))
      swaps += 1
  finally:
    stop.touch()
    missing, checks = map(int, watcher.communicate(timeout=60)[0].split())
  assert checks > 0 and missing == 0, f"{final} was missing in {missing} of {checks} checks"
  assert not renamed_away
  assert (final / "version").read_text() == str(swaps - 1)
  assert os.listdir(tmp_path) == ["out"]


def test_without_rename_exchange_the_output_is_still_replaced_and_nothing_is_left(tmp_path,
                                                                                 monkeypatch):
  monkeypatch.setattr(outputs, "_renameat2", lambda src, dst, flags: False)  # e.g. not Linux
  final = _tree(tmp_path / "out", ["old.txt"])
  with outputs.TemporaryOutput(final, overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
  assert os.listdir(final) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
  with pytest.raises(FileExistsError, match="already exists"):
    with outputs.TemporaryOutput(final) as tmp:
      (tmp / "newer.txt").write_text("newer")
  assert os.listdir(final) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def _die_leaving_a_temporary(path: pathlib.Path, overwrite=False, then="pass") -> None:
  """A process that starts writing `path`, runs `then` and dies without cleaning up (as kill -9
  leaves it)."""
  code = ("import os, sys; from maxnucl import outputs; "
          f"tmp = outputs.TemporaryOutput(sys.argv[1], overwrite={overwrite}); "
          f"(tmp.content / 'part').write_text('x'); {then}; os._exit(9)")
  assert subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO,
                        check=False).returncode == 9


def test_temporaries_of_dead_processes_are_removed_and_all_others_kept(tmp_path, caplog):
  out = tmp_path / "out"
  live = outputs.TemporaryOutput(out)  # this process's: alive
  _die_leaving_a_temporary(out)
  (dead,) = [p for p in tmp_path.glob(".out.tmp-*") if p != live.root]
  assert (dead / outputs.CONTENT / "part").exists()
  record = json.loads((live.root / outputs.OWNER_FILE).read_text())
  reused = _tree(tmp_path / ".out.tmp-reused")  # this pid, but recorded by an earlier process
  (reused / outputs.OWNER_FILE).write_text(json.dumps({**record,
                                                       "start_time": record["start_time"] - 1}))
  elsewhere = _tree(tmp_path / ".out.tmp-elsewhere")  # another machine's processes are unknown
  (elsewhere / outputs.OWNER_FILE).write_text(json.dumps({**record, "hostname": "elsewhere"}))
  legacy = _tree(tmp_path / ".out.tmp-legacy")  # no owner record: an older maxnucl's
  (tmp_path / ".out.tmp-link").symlink_to(reused)  # never followed

  assert sorted(outputs.remove_stale_temporaries(out)) == sorted([dead, reused])
  assert not dead.exists() and not reused.exists()
  assert live.root.exists() and elsewhere.exists() and legacy.exists()
  assert f"{legacy}: a temporary directory of {out} without an owner record" in caplog.text
  live.discard()
  assert not live.root.exists()


def test_run_killed_between_the_fallback_renames_gets_the_old_output_back(tmp_path):
  out = _tree(tmp_path / "out", ["old.txt"])
  # the first of replace_directory's two renames (no RENAME_EXCHANGE), then SIGKILL
  _die_leaving_a_temporary(out, overwrite=True, then="os.rename(sys.argv[1], tmp.root / 'old')")
  assert not out.exists()
  assert len(outputs.remove_stale_temporaries(out)) == 1
  assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["out"]


def test_evaluator_analysis_and_data_tools_refuse_an_output_inside_their_input(
    saved, tmp_path, monkeypatch, capsys):
  from maxnucl import evaluate  # pylint: disable=import-outside-toplevel
  from maxnucl.data import pipeline, sources, vocabularies  # pylint: disable=import-outside-toplevel
  from maxnucl.pruning import analysis  # pylint: disable=import-outside-toplevel
  _, _, ckpt = saved
  before = _checksums(ckpt)
  (tmp_path / "link").symlink_to(ckpt)
  gin.clear_config()
  try:
    assert evaluate.main(["--gin_file=gin/eval/perplexity.gin", f"--checkpoint={ckpt}",
                          f"--output={tmp_path / 'link' / 'eval'}"]) == 2
  finally:
    gin.clear_config()
  assert (f"--output {tmp_path / 'link' / 'eval'} (resolves to {ckpt / 'eval'}) lies inside the "
          f"checkpoint {ckpt}") in capsys.readouterr().err
  with pytest.raises(outputs.OutputPathError, match="--output_dir .* is the input checkpoint"):
    analysis.analyze_ffn(ckpt, tmp_path / "link", methods=["entropy"])
  assert _checksums(ckpt) == before

  data = _tree(tmp_path / "data", ["gsm8k.jsonl"])
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(data))
  with pytest.raises(outputs.OutputPathError) as error:
    pipeline.cache_task("gsm8k", "train", data / "cache")
  assert (f"cache directory {data / 'cache' / 'gsm8k' / 'train'} lies inside the data root "
          f"{data}") in str(error.value)
  text = data / "corpus.model"
  text.write_text("a sentence\n")
  with pytest.raises(outputs.OutputPathError, match="is the training text file"):
    vocabularies.train_sentencepiece([text], data / "corpus")
  assert sorted(os.listdir(data)) == ["corpus.model", "gsm8k.jsonl"]
