"""maxnucl checkpoints: self-describing, exact, sharded restore, and safe failure modes."""

import hashlib
import json
import os
import pathlib
import shutil
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


# ---- untrusted checkpoints: every reader refuses what it cannot trust (issue 28) ---------------

import google_crc32c  # noqa: E402

from maxnucl import generate  # noqa: E402
from maxnucl.conversion import cli as convert_cli  # noqa: E402
from maxnucl.models.config import ConfigError  # noqa: E402
from maxnucl.pruning import cli as prune_cli  # noqa: E402
from maxnucl.pruning import io as pruning_io  # noqa: E402

import fuzzing  # noqa: E402

TINY_PRUNED = dict(ffn_widths=(256, 0, 96, 32))


@pytest.fixture(scope="module")
def zarr_ckpt(tmp_path_factory):
  """A pruned checkpoint written by StreamingWriter: one zarr directory per leaf."""
  cfg = models.get_config("gemma2_tiny", **TINY_PRUNED)
  params = models.init(cfg, jax.random.PRNGKey(0))
  path = tmp_path_factory.mktemp("zarr") / "pruned"
  with checkpoints.StreamingWriter(path, cfg) as writer:
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      writer.write(tuple(k.key for k in keys), np.asarray(leaf))
  return cfg, params, path


@pytest.fixture(scope="module")
def ocdbt_ckpt(tmp_path_factory):
  """The same model saved by `checkpoints.save` (Orbax's OCDBT store)."""
  cfg = models.get_config("gemma2_tiny", **TINY_PRUNED)
  params = models.init(cfg, jax.random.PRNGKey(0))
  path = tmp_path_factory.mktemp("ocdbt") / "saved"
  checkpoints.save(path, cfg, params)
  return cfg, params, path


def _copy(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  target = tmp_path / "ckpt"
  shutil.copytree(source, target)
  return target


def _slash_separated(path: pathlib.Path, leaf: str) -> None:
  """Rewrite one zarr leaf with "dimension_separator": "/" (chunk 0.0 stored as 0/0)."""
  leaf_dir = path / "params" / leaf
  zarray = json.loads((leaf_dir / ".zarray").read_text())
  zarray["dimension_separator"] = "/"
  (leaf_dir / ".zarray").write_text(json.dumps(zarray))
  for chunk in [p for p in leaf_dir.iterdir() if not p.name.startswith(".")]:
    target = leaf_dir / chunk.name.replace(".", "/")
    target.parent.mkdir(parents=True, exist_ok=True)
    chunk.rename(target)


def _read_lazily(path: pathlib.Path, key) -> None:
  """What the pruner does with a tensor it copies: rows read in blocks, in order, then verified."""
  view = pruning_io.CheckpointReader(path).open_lazy(key)
  for start in range(0, view.shape[0], 7):
    np.asarray(view[start:min(start + 7, view.shape[0])])
  if hasattr(view, "finish"):
    view.finish()


def _readers(path: pathlib.Path, tmp_path: pathlib.Path, leaf=None) -> dict:
  """Every reader of a maxnucl checkpoint, each as a () -> fuzzing.Run; `leaf` (a damaged
  tensor) adds the single-array readers of it."""
  def library(fn):
    def run():
      try:
        fn()
      except ValueError as e:
        return fuzzing.Run(2, "", f"error: {e}\n")
      return fuzzing.Run(0, "", "")
    return run

  def cli(main, argv):
    return lambda: fuzzing.run_main(main, argv, timeout_s=120)

  readers = {
      "load": library(lambda: checkpoints.load(path)),
      "iter_arrays": library(lambda: list(checkpoints.iter_arrays(path))),
      "maxnucl-to-hf": cli(convert_cli.main, [
          "maxnucl-to-hf", "--input", str(path), "--output", str(tmp_path / "hf"),
          "--ffn_widths_export", "pad", "--vocab", "none"]),
      "maxnucl-prune": cli(prune_cli.prune_main, [
          "--input", str(path), "--output", str(tmp_path / "pruned"), "--method", "magnitude",
          "--ratio", "0.25", "--vocab", "byte"]),
      "generate": cli(generate.main, ["--checkpoint", str(path), "--prompt", "a",
                                      "--max_new_tokens", "2"]),
  }
  if leaf is not None:
    readers["read_array"] = library(lambda: checkpoints.read_array(path, leaf))
    readers["CheckpointReader.open_lazy"] = library(lambda: _read_lazily(path, leaf))
  return readers


def refusal_lines(stderr: str) -> list[str]:
  # maxnucl-prune announces the vocabulary it uses before it reads the checkpoint: not part of
  # the refusal
  return [l for l in fuzzing.refusal_lines(stderr) if not l.startswith("vocabulary: ")]


def _assert_every_reader_refuses(path, tmp_path, *names, leaf=None):
  for reader, run in _readers(path, tmp_path, leaf).items():
    result = run()
    assert not result.error, f"{reader}: {result.error}"
    lines = refusal_lines(result.stderr)
    assert result.exit_code == 2 and len(lines) == 1, (reader, result.exit_code, lines)
    for name in names:
      assert name in lines[0], (reader, name, lines[0])
  assert not (tmp_path / "hf").exists() and not (tmp_path / "pruned").exists()


EMBEDDING = ("embedder", "embedding")


@pytest.mark.parametrize("separator", [".", "/"])
def test_a_missing_chunk_is_refused_by_every_reader_never_read_as_zeros(zarr_ckpt, tmp_path,
                                                                        separator):
  path = _copy(zarr_ckpt[2], tmp_path)
  leaf = "embedder.embedding"
  if separator == "/":
    _slash_separated(path, leaf)
  chunk = path / "params" / leaf / ("0.0" if separator == "." else "0/0")
  chunk.unlink()
  _assert_every_reader_refuses(path, tmp_path, "embedder", "0", leaf=EMBEDDING)


def test_a_missing_tensor_directory_is_named_with_its_tensor_not_a_spec_dump(zarr_ckpt,
                                                                             tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  shutil.rmtree(path / "params" / "layers_0.mlp.out")
  _assert_every_reader_refuses(path, tmp_path, "tensor layers_0/mlp/out",
                               str(path / "params" / "layers_0.mlp.out") + ": missing")
  for reader, run in _readers(path, tmp_path, None).items():
    assert "tensorstore_spec" not in run().stderr, reader


def test_every_writer_records_the_crc32c_of_each_array(zarr_ckpt, ocdbt_ckpt):
  for cfg, params, path in (zarr_ckpt, ocdbt_ckpt):
    recorded = checkpoints.stored_checksums(path)
    flat = {tuple(k.key for k in keys): np.asarray(leaf)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(recorded) == set(flat)
    for key, array in flat.items():
      assert recorded[key] == google_crc32c.value(np.ascontiguousarray(array).tobytes()), key


def _flip_inside_chunk(chunk: pathlib.Path, at: int) -> None:
  data = bytearray(chunk.read_bytes())
  data[at] ^= 0x01  # the lowest mantissa bit of a float32: the value stays finite
  chunk.write_bytes(bytes(data))


def test_a_corrupted_chunk_is_refused_by_its_checksum(zarr_ckpt, tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  _flip_inside_chunk(path / "params" / "embedder.embedding" / "0.0", 400)
  _assert_every_reader_refuses(path, tmp_path, "embedder", "checksum", leaf=EMBEDDING)


@pytest.mark.parametrize("field,value", [("dtype", ">f4"), ("order", "F")])
def test_a_reinterpreted_zarr_array_is_refused(zarr_ckpt, tmp_path, field, value):
  path = _copy(zarr_ckpt[2], tmp_path)
  zarray_file = path / "params" / "embedder.embedding" / ".zarray"
  zarray = json.loads(zarray_file.read_text())
  zarray[field] = value
  zarray_file.write_text(json.dumps(zarray))
  _assert_every_reader_refuses(path, tmp_path, "embedder", leaf=EMBEDDING)


def test_bit_flips_in_the_ocdbt_data_file_are_refused(ocdbt_ckpt, tmp_path):
  path = _copy(ocdbt_ckpt[2], tmp_path)
  data = max((path / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  for at in (1000, data.stat().st_size // 2, data.stat().st_size - 2000):
    _flip_inside_chunk(data, at)
  with pytest.raises(checkpoints.CheckpointError, match="params"):
    checkpoints.load(path)


def test_a_checkpoint_written_before_checksums_still_loads_with_a_warning(zarr_ckpt, tmp_path,
                                                                          caplog):
  path = _copy(zarr_ckpt[2], tmp_path)
  metadata_file = path / "params" / "_METADATA"
  metadata = json.loads(metadata_file.read_text())
  metadata["custom_metadata"] = None
  metadata_file.write_text(json.dumps(metadata))
  _, loaded = checkpoints.load(path)
  assert _tree_equal(zarr_ckpt[1], loaded)
  assert "no checksums" in caplog.text


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=1)
  params = models.init(cfg, jax.random.PRNGKey(0))
  params["layers_0"]["mlp"]["out"] = params["layers_0"]["mlp"]["out"].at[3, 5].set(np.nan)
  checkpoints.save(tmp_path / "nan", cfg, params)
  with pytest.raises(checkpoints.CheckpointError, match="layers_0/mlp/out.*non-finite"):
    checkpoints.load(tmp_path / "nan")
  with pytest.raises(checkpoints.CheckpointError, match="layers_0/mlp/out.*non-finite"):
    checkpoints.read_array(tmp_path / "nan", ("layers_0", "mlp", "out"))
  _, loaded = checkpoints.load(tmp_path / "nan", allow_nonfinite=True)
  assert np.isnan(np.asarray(loaded["layers_0"]["mlp"]["out"])[3, 5])


def test_nan_bytes_in_a_chunk_are_refused_with_one_line(zarr_ckpt, tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  chunk = path / "params" / "layers_0.mlp.out" / "0.0"
  data = bytearray(chunk.read_bytes())
  data[64:68] = np.array([np.nan], "<f4").tobytes()
  chunk.write_bytes(bytes(data))
  _assert_every_reader_refuses(path, tmp_path, "layers_0.mlp.out", "checksum",
                               leaf=("layers_0", "mlp", "out"))
  # without checksums (a checkpoint written before them), the value itself is refused
  metadata_file = path / "params" / "_METADATA"
  metadata = json.loads(metadata_file.read_text())
  metadata["custom_metadata"] = None
  metadata_file.write_text(json.dumps(metadata))
  _assert_every_reader_refuses(path, tmp_path, "layers_0.mlp.out", "non-finite",
                               leaf=("layers_0", "mlp", "out"))


# ---- malformed metadata: one line naming the file -----------------------------------------------

def test_empty_tree_metadata_is_refused_naming_the_file(zarr_ckpt, tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  (path / "params" / "_METADATA").write_text("{}")
  _assert_every_reader_refuses(path, tmp_path, "_METADATA", leaf=EMBEDDING)


def test_a_zarr_shape_off_by_one_is_refused_naming_the_file(zarr_ckpt, tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  zarray_file = path / "params" / "layers_2.mlp.out" / ".zarray"
  zarray = json.loads(zarray_file.read_text())
  zarray["shape"][0] += 1
  zarray_file.write_text(json.dumps(zarray))
  _assert_every_reader_refuses(path, tmp_path, "layers_2.mlp.out")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_ocdbt_data_file_is_refused_naming_the_file(ocdbt_ckpt, tmp_path, damage):
  path = _copy(ocdbt_ckpt[2], tmp_path)
  data = max((path / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  if damage == "delete":
    data.unlink()
  else:
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  _assert_every_reader_refuses(path, tmp_path, "params")


def test_a_truncated_model_config_is_refused_naming_the_file(zarr_ckpt, tmp_path):
  path = _copy(zarr_ckpt[2], tmp_path)
  config_file = path / "model_config" / "metadata"
  config_file.write_text(config_file.read_text()[:200])
  _assert_every_reader_refuses(path, tmp_path, "model_config")


# ---- the model config: validated where it is built ---------------------------------------------

BAD_CONFIG_FIELDS = [
    ("num_layers", 10**12), ("rope_theta", 0.0), ("rope_theta", -1.0),
    ("rope_theta", float("nan")), ("norm_eps", -1.0), ("norm_eps", float("nan")),
    ("attn_logit_softcap", 0.0), ("attn_logit_softcap", -50.0),
    ("final_logit_softcap", float("nan")), ("query_pre_attn_scalar", 0.0),
    ("query_pre_attn_scalar", -16.0), ("query_pre_attn_scalar", float("inf")),
    ("ffn_widths", 256), ("attention_pattern", "local"), ("attention_pattern", 5),
    ("vocab_size", "384"), ("d_model", 64.0), ("d_model", True), ("rope_theta", "1e4"),
    ("sliding_window", -4), ("sliding_window", 2.5), ("d_model", 10**12),
    ("vocab_size", 10**12), ("max_positions", 0), ("max_positions", 10**12),
    ("rope_local_theta", -1.0), ("dropout_rate", "x"), ("dropout_rate", float("nan")),
    ("pad_id", -1), ("eos_id", 384), ("bos_id", "2"), ("name", 5), ("rope_scaling", "linear"),
    ("ffn_dim", 10**12), ("ffn_widths", [256, 0, 96, "32"]), ("ffn_widths", [256, 0, 96, 1e12]),
]


@pytest.mark.parametrize("field,value", BAD_CONFIG_FIELDS)
def test_an_invalid_config_field_is_refused_naming_it(field, value):
  data = models.get_config("gemma2_tiny", **TINY_PRUNED).to_dict()
  data[field] = value
  with pytest.raises(ConfigError, match=f"'{field}'"):
    models.ModelConfig.from_dict(data)


@pytest.mark.parametrize("field,value", [("num_layers", 10**12), ("rope_theta", 0.0),
                                         ("norm_eps", -1.0), ("ffn_widths", 256)])
def test_a_checkpoint_with_an_invalid_config_is_refused_naming_field_and_file(
    zarr_ckpt, tmp_path, field, value):
  path = _copy(zarr_ckpt[2], tmp_path)
  config_file = path / "model_config" / "metadata"
  data = json.loads(config_file.read_text())
  data[field] = value
  config_file.write_text(json.dumps(data))
  start = time.monotonic()
  _assert_every_reader_refuses(path, tmp_path, field, "model_config")
  assert time.monotonic() - start < 60


def test_a_config_that_does_not_fit_the_bytes_on_disk_is_refused(zarr_ckpt, tmp_path):
  """A config whose tensors are larger than the stored arrays is refused before any read."""
  path = _copy(zarr_ckpt[2], tmp_path)
  config_file = path / "model_config" / "metadata"
  data = json.loads(config_file.read_text())
  data["vocab_size"] = 10**9
  config_file.write_text(json.dumps(data))
  _assert_every_reader_refuses(path, tmp_path, "model_config")


def test_the_trainer_records_checksums_and_resume_refuses_a_corrupted_step(tmp_path):
  """The trainer's Orbax step checkpoints carry the CRC32C of every params array (what
  `checkpoints.load` verifies), and its resume checks them: a bit flip that leaves a value finite
  and decodable is caught, the step moved aside, training resumes from the previous one."""
  from maxnucl import gin_config, train  # pylint: disable=import-outside-toplevel

  def run(steps):
    gin.clear_config()
    gin_config.parse(["gin/demo_cpu.gin"], [
        "model_config.num_layers = 2", "DATA_SEQ_LEN = 32", "DATA_BATCH_SIZE = 8",
        "train_loop.progress_bar = False", "train_loop.eval_every = 0",
        "train_loop.log_every = 1", "train_loop.checkpoint_every = 2",
        "train_loop.async_checkpointing = False", f"train_loop.num_steps = {steps}"])
    try:
      train.train_loop(tmp_path, mesh=sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
    finally:
      gin.clear_config()

  run(4)
  step = tmp_path / "checkpoints" / "4"
  cfg, params = checkpoints.load(step)  # verified against the recorded checksums
  recorded = checkpoints.stored_checksums(step)
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = tuple(k.key for k in keys)
    assert recorded[key] == google_crc32c.value(np.asarray(leaf).tobytes()), key
  # Change one stored value in place (read, alter the lowest bit of one float, write back
  # through TensorStore, so the OCDBT store stays decodable: only the checksum can tell).
  store = checkpoints.open_array(step, ("final_norm", "scale")).store
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  writable = ts.open(store.spec(), open=True, read=True, write=True).result()
  value = np.asarray(writable[0:1].read().result())
  writable[0:1].write((value.view(np.uint32) ^ np.uint32(1)).view(np.float32)).result()
  with pytest.raises(checkpoints.CheckpointError, match="final_norm/scale.*checksum"):
    checkpoints.load(step)
  run(6)  # resumes: step 4 is corrupted, moved aside; step 2 is used
  assert (tmp_path / "checkpoints" / "corrupted_step_4").is_dir()
  assert (tmp_path / "checkpoints" / "6").is_dir()
