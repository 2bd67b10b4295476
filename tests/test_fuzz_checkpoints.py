"""A seeded mutation fuzz of the maxnucl checkpoint readers (issue 28, item 9).

Specifies: every mutant of a tiny checkpoint — its model config, its tree metadata
(params/_METADATA, checksums included), a zarr leaf's .zarray and chunk files, the OCDBT store's
files (manifest, data files: truncated, bit-flipped, deleted) — read by `checkpoints.load` (what
generate, evaluate and calibration use), `maxnucl-convert maxnucl-to-hf` and `maxnucl-prune` is
either ACCEPTED with the original model (config valid, every array bit-identical) or REFUSED in
one line naming the file; never a traceback, a hang, a modified input or a partial output
(tests/fuzzing.py classifies each run).
"""

import json
import shutil

import jax
import numpy as np
import pytest

from maxnucl import checkpoints, models
from maxnucl.conversion import cli as convert_cli
from maxnucl.pruning import cli as prune_cli

import fuzzing

SEED = 28
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
  """(cfg, flat params, {layout: checkpoint}) of a two-layer pruned model in both layouts."""
  cfg = models.get_config("gemma2_tiny", num_layers=2, ffn_widths=(64, 0), vocab_size=64)
  params = models.init(cfg, jax.random.PRNGKey(0))
  flat = {tuple(k.key for k in keys): np.asarray(leaf)
          for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  root = tmp_path_factory.mktemp("fuzz_originals")
  checkpoints.save(root / "ocdbt", cfg, params)
  with checkpoints.StreamingWriter(root / "zarr", cfg) as writer:
    for key, array in flat.items():
      writer.write(key, array)
  return cfg, flat, {"ocdbt": root / "ocdbt", "zarr": root / "zarr"}


def _load_main(argv):
  """`checkpoints.load` as a command: exit 2 and one line on a ValueError, as the CLIs do."""
  import sys  # pylint: disable=import-outside-toplevel
  try:
    checkpoints.load(argv[0])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _mutants(originals, rng):
  """(name, layout, relative file, new bytes or None = deleted, names a refusal may give)."""
  _, _, sources = originals
  zarr = sources["zarr"]
  config = json.loads((zarr / "model_config" / "metadata").read_text())
  for name, value in fuzzing.json_mutants(config, rng, 70):
    yield f"config:{name}", "zarr", "model_config/metadata", fuzzing.dumps(value).encode(), \
        ("model_config",)
  for name, data in fuzzing.byte_mutants((zarr / "model_config" / "metadata").read_bytes(),
                                         rng, 15):
    yield f"config bytes:{name}", "zarr", "model_config/metadata", data, ("model_config",)
  metadata = json.loads((zarr / "params" / "_METADATA").read_text())
  for name, value in fuzzing.json_mutants(metadata, rng, 50):
    yield f"_METADATA:{name}", "zarr", "params/_METADATA", fuzzing.dumps(value).encode(), \
        ("_METADATA", "params")
  leaves = sorted(p.name for p in (zarr / "params").iterdir() if p.is_dir())
  for i in range(40):
    leaf = leaves[int(rng.integers(len(leaves)))]
    zarray = json.loads((zarr / "params" / leaf / ".zarray").read_text())
    for name, value in fuzzing.json_mutants(zarray, rng, 1):
      yield f".zarray {leaf}:{name}", "zarr", f"params/{leaf}/.zarray", \
          fuzzing.dumps(value).encode(), (leaf,)
  for i in range(50):
    leaf = leaves[int(rng.integers(len(leaves)))]
    chunks = sorted(p.name for p in (zarr / "params" / leaf).iterdir()
                    if not p.name.startswith("."))
    chunk = chunks[int(rng.integers(len(chunks)))]
    file = f"params/{leaf}/{chunk}"
    if i % 10 == 0:
      yield f"chunk {file}:deleted", "zarr", file, None, (leaf,)
      continue
    for name, data in fuzzing.byte_mutants((zarr / file).read_bytes(), rng, 1):
      yield f"chunk {file}:{name}", "zarr", file, data, (leaf,)
  ocdbt = sources["ocdbt"]
  files = sorted(str(p.relative_to(ocdbt)) for p in (ocdbt / "params").rglob("*")
                 if p.is_file() and p.name not in ("_METADATA", "_sharding"))
  for i in range(60):
    file = files[int(rng.integers(len(files)))]
    if i % 6 == 0:
      yield f"ocdbt {file}:deleted", "ocdbt", file, None, ("params",)
      continue
    for name, data in fuzzing.byte_mutants((ocdbt / file).read_bytes(), rng, 1):
      yield f"ocdbt {file}:{name}", "ocdbt", file, data, ("params",)


def _valid(originals, path):
  """None when the checkpoint reads as the original model (config valid, arrays identical)."""
  cfg, flat, _ = originals
  try:
    loaded_cfg, params = checkpoints.load(path)
  except ValueError as e:
    return f"accepted by one reader, refused by load: {e}"
  if not fuzzing.is_finite_json(loaded_cfg.to_dict()):
    return "non-finite config value accepted"
  shapes_cfg = loaded_cfg.replace(name=cfg.name)
  if models.abstract_params(shapes_cfg) is None:
    return "no params"
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = tuple(k.key for k in keys)
    if key not in flat or not np.array_equal(np.asarray(leaf), flat[key]) \
        or np.asarray(leaf).dtype != flat[key].dtype:
      return f"tensor {'/'.join(key)} differs from the original"
  return None


def test_every_checkpoint_mutant_is_read_validly_or_refused_in_one_line(originals, tmp_path):
  rng = np.random.default_rng(SEED)
  tallies = {reader: fuzzing.Tally(reader) for reader in
             ("checkpoints.load", "maxnucl-convert maxnucl-to-hf", "maxnucl-prune")}
  for index, (name, layout, file, data, names) in enumerate(_mutants(originals, rng)):
    path = tmp_path / f"m{index}"
    shutil.copytree(originals[2][layout], path)
    target = path / file
    if data is None:
      target.unlink()
    else:
      target.write_bytes(data)
    before = fuzzing.tree_digest(path)
    runs = [("checkpoints.load", _load_main, [str(path)], None)]
    if index % 4 == 0:
      runs.append(("maxnucl-convert maxnucl-to-hf", convert_cli.main,
                   ["maxnucl-to-hf", "--input", str(path), "--output", str(tmp_path / "hf"),
                    "--ffn_widths_export", "pad", "--vocab", "none"], tmp_path / "hf"))
    if index % 4 == 1:
      runs.append(("maxnucl-prune", prune_cli.prune_main,
                   ["--input", str(path), "--output", str(tmp_path / "pruned"),
                    "--method", "magnitude", "--ratio", "0.25", "--vocab", "byte"],
                   tmp_path / "pruned"))
    for reader, main, argv, output in runs:
      run = fuzzing.run_main(main, argv, TIMEOUT_S)
      # maxnucl-prune announces its vocabulary on stderr before reading: not part of a refusal
      run.stderr = "\n".join(l for l in run.stderr.splitlines()
                             if not l.startswith("vocabulary: "))
      outcome, detail = fuzzing.classify(run, list(names) + [file], before,
                                         fuzzing.tree_digest(path), output,
                                         valid=lambda: _valid(originals, path))
      tallies[reader].add(name, outcome, detail)
      if output is not None and outcome == fuzzing.ACCEPTED:
        shutil.rmtree(output)
    shutil.rmtree(path)
  failures = []
  for tally in tallies.values():
    try:
      tally.assert_clean()
    except AssertionError as e:
      failures.append(str(e))
  assert not failures, "\n".join(failures)
