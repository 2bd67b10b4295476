"""Checkpoints, converters, pruner, evaluation and trainer on URLs, each in two stores: `gs://`
buckets on a Cloud Storage emulator (tests/gcs_emulator.py: the real gcs clients, TensorStore's
`gcs` driver, gcsfs) and `file://` URLs, which run the same code path (etils.epath, TensorStore
kvstore URLs, publication by copying with a commit marker) on a local disk.  Both must give
exactly what local paths give."""

import hashlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from maxnucl import checkpoints, models, outputs, paths
from maxnucl.conversion import convert
from maxnucl.evaluation import core
from maxnucl.outputs import OutputPathError
from maxnucl.pruning import prune_ffn_neurons

TINY = models.get_config("gemma2_tiny")


def _url(path) -> str:
  return "file://" + str(pathlib.Path(path).absolute())


class Store:
  """Where a test's URL outputs go: under a `gs://` bucket or a `file://` directory."""

  def __init__(self, root: str):
    self.root = root

  def url(self, name: str) -> str:
    return f"{self.root}/{name}"

  def path(self, name: str):
    return paths.as_path(self.url(name))


@pytest.fixture(params=["file", "gs"])
def store(request, tmp_path) -> Store:
  """A `file://` directory, or a new bucket on the Cloud Storage emulator."""
  if request.param == "gs":
    return Store(request.getfixturevalue("gcs_bucket"))
  (tmp_path / "store").mkdir()
  return Store(_url(tmp_path / "store"))


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[0]))
                      .astype(np.float32), models.abstract_params(cfg))


def _checksums(directory) -> dict:
  """sha256 of every file below `directory` (a local path or a URL) by relative name."""
  directory = paths.as_path(directory)
  return {"/".join(parts): hashlib.sha256(directory.joinpath(*parts).read_bytes()).hexdigest()
          for parts in paths.files_below(directory)}


def _content(directory) -> dict:
  """`_checksums` less the commit marker and the timestamps of _CHECKPOINT_METADATA: what must
  be equal between a URL output and the same output written to a local path."""
  sums = _checksums(directory)
  return {k: v for k, v in sums.items()
          if k not in (outputs.COMMIT_MARKER, "_CHECKPOINT_METADATA")}


def _assert_same_params(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (key, x), (_, y) in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype, key
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(key))


def _no_temporaries(directory) -> bool:
  return not [p for p in paths.as_path(directory).iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def local_ckpt(tmp_path_factory):
  """A tiny maxnucl checkpoint on a local path, and its params."""
  params = _random_params(TINY)
  path = tmp_path_factory.mktemp("local") / "tiny"
  checkpoints.save(path, TINY, params)
  return path, params


@pytest.fixture(scope="module")
def hf_dir(local_ckpt, tmp_path_factory):
  """The tiny checkpoint as a Hugging Face directory (local path)."""
  path = tmp_path_factory.mktemp("hf") / "tiny_hf"
  convert.maxnucl_to_hf(local_ckpt[0], path)
  return path


# ---- the path abstraction -------------------------------------------------------------------------

def test_file_urls_are_urls_and_compare_by_normalised_url(tmp_path):
  url = _url(tmp_path)
  assert paths.is_url(url) and paths.is_url("gs://bucket/dir") and not paths.is_url(tmp_path)
  assert str(paths.as_path(url)) == url  # stays a URL: not turned into a local path
  assert paths.is_url(paths.as_path(url) / "a")
  assert paths.kvstore_spec(url) == url + "/"
  assert paths.url_key(url + "/a/../b/") == paths.url_key(tmp_path / "b")
  assert paths.url_key("gs://bucket//a/./b/") == "gs://bucket/a/b"
  assert paths.key_within("gs://bucket/a/b", "gs://bucket/a")
  assert not paths.key_within("gs://bucket/ab", "gs://bucket/a")
  with pytest.raises(ValueError, match="collapsed"):
    paths.as_path(pathlib.Path("gs://bucket/dir"))  # pathlib made it "gs:/bucket/dir"
  with pytest.raises(NotImplementedError, match="no rename"):
    (paths.as_path(url) / "x").rename(paths.as_path(url) / "y")


# ---- checkpoints --------------------------------------------------------------------------------

def test_save_load_through_a_url_equals_local_path(local_ckpt, store):
  path, params = local_ckpt
  url = store.url("ckpt")
  assert str(checkpoints.save(url, TINY, params)) == url
  assert (store.path("ckpt") / outputs.COMMIT_MARKER).is_file()
  assert _no_temporaries(store.root)
  cfg_url, from_url = checkpoints.load(url)
  cfg_local, from_local = checkpoints.load(path)
  assert cfg_url == cfg_local == TINY
  _assert_same_params(from_url, from_local)
  assert str(checkpoints.resolve(url)) == url
  key = ("layers_1", "mlp", "out")
  np.testing.assert_array_equal(checkpoints.read_array(url, key),
                                checkpoints.read_array(path, key))
  np.testing.assert_array_equal(np.asarray(checkpoints.open_array(url, key)[2:5]),
                                np.asarray(params["layers_1"]["mlp"]["out"][2:5]))
  assert checkpoints.stored_arrays(url) == checkpoints.stored_arrays(path)


def test_streaming_writer_through_a_url_equals_local_path(local_ckpt, store, tmp_path):
  path, params = local_ckpt
  for target in (tmp_path / "local", store.url("url")):
    with checkpoints.StreamingWriter(target, TINY, dtype="bfloat16") as writer:
      for key, array in checkpoints.iter_arrays(path):
        writer.write(key, array)
  assert _content(store.url("url")) == _content(tmp_path / "local")
  assert (store.path("url") / outputs.COMMIT_MARKER).is_file()
  _assert_same_params(checkpoints.load(store.url("url"))[1],
                      checkpoints.load(tmp_path / "local")[1])
  assert _no_temporaries(store.root)


def test_url_checkpoint_without_commit_marker_is_refused_as_incomplete(local_ckpt, store):
  url = store.url("ckpt")
  checkpoints.save(url, TINY, local_ckpt[1])
  (store.path("ckpt") / outputs.COMMIT_MARKER).unlink()
  for read in (checkpoints.load, checkpoints.load_config, checkpoints.stored_arrays,
               checkpoints.resolve,
               lambda p: checkpoints.read_array(p, ("layers_0", "mlp", "out")),
               lambda p: prune_ffn_neurons(p, store.url("pruned"), method="entropy",
                                           ratio=0.5),
               lambda p: convert.maxnucl_to_hf(p, store.url("hf"))):
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"incomplete \(no commit marker commit_success.txt\)"):
      read(url)
  assert not store.path("pruned").exists() and not store.path("hf").exists()


def test_existing_url_output_is_refused_without_overwrite_and_replaced_with_it(local_ckpt,
                                                                               store):
  path, params = local_ckpt
  url = store.url("ckpt")
  checkpoints.save(url, TINY, params)
  before = _checksums(url)
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoints.save(url, TINY, params)
  with pytest.raises(FileExistsError, match="already exists"):
    prune_ffn_neurons(path, url, method="entropy", ratio=0.5)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.maxnucl_to_hf(path, url)
  assert _checksums(url) == before
  prune_ffn_neurons(path, url, method="entropy", ratio=0.5, overwrite=True)
  cfg, _ = checkpoints.load(url)
  assert cfg.layer_ffn_widths == tuple(w // 2 for w in TINY.layer_ffn_widths)
  assert _no_temporaries(store.root)


def test_url_output_equal_to_or_inside_an_input_is_refused(local_ckpt, hf_dir, tmp_path):
  path, _ = local_ckpt
  url = _url(path)
  for output in (url, url + "/inside", url + "/../" + path.name + "/params/x"):
    with pytest.raises(OutputPathError, match="is the|lies inside"):
      prune_ffn_neurons(url, output, method="entropy", ratio=0.5)
    with pytest.raises(OutputPathError, match="is the|lies inside"):
      prune_ffn_neurons(path, output, method="entropy", ratio=0.5)  # local input, URL output
  with pytest.raises(OutputPathError, match="lies inside"):
    convert.hf_to_maxnucl(_url(hf_dir), _url(hf_dir / "out"))
  with pytest.raises(OutputPathError, match="contains"):
    convert.maxnucl_to_hf(url, _url(path.parent), overwrite=True)
  with pytest.raises(OutputPathError, match="is the"):
    convert.maxnucl_to_hf(url, path, overwrite=True)  # URL input, local output


def test_output_equal_to_or_inside_a_bucket_input_is_refused(local_ckpt, gcs_bucket):
  url = gcs_bucket + "/ckpt"
  checkpoints.save(url, TINY, local_ckpt[1])
  before = _checksums(url)
  for output in (url, url + "/inside", gcs_bucket + "/x/../ckpt/params/x"):
    with pytest.raises(OutputPathError, match="is the|lies inside"):
      prune_ffn_neurons(url, output, method="entropy", ratio=0.5, overwrite=True)
  with pytest.raises(OutputPathError, match="contains"):
    convert.maxnucl_to_hf(url, gcs_bucket, overwrite=True)
  assert _checksums(url) == before


def test_failed_publication_leaves_nothing_at_the_url(local_ckpt, store, monkeypatch):
  copied = []

  def failing_copy(source, target):
    if len(copied) == 3:
      raise OSError("connection reset")
    copied.append(target)
    target.write_bytes(source.read_bytes())

  monkeypatch.setattr(paths, "copy_file", failing_copy)
  with pytest.raises(OSError, match="connection reset"):
    checkpoints.save(store.url("ckpt"), TINY, local_ckpt[1])
  assert len(copied) == 3
  assert list(paths.as_path(store.root).iterdir()) == []


KILLED_MID_UPLOAD = """
import os, signal, sys
from maxnucl import checkpoints, paths
copy_file, copied = paths.copy_file, []
def copy_then_die(source, target):  # SIGKILL after 3 objects of the publication
  if len(copied) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  copy_file(source, target)
  copied.append(target)
paths.copy_file = copy_then_die
cfg, params = checkpoints.load(sys.argv[1])
checkpoints.save(sys.argv[2], cfg, params)
"""


def test_a_writer_killed_mid_upload_leaves_it_unpublished_and_the_next_writer_finishes_it(
    local_ckpt, store):
  """A real process killed (SIGKILL) while copying its finished output to the URL leaves the
  output without its commit marker, refused by every reader as incomplete, and its temporary
  prefix (owner dead, `publishing` recorded); the next writer of that URL completes it."""
  path, params = local_ckpt
  url = store.url("ckpt")
  killed = subprocess.run([sys.executable, "-c", KILLED_MID_UPLOAD, str(path), url],
                          capture_output=True, text=True, timeout=300, check=False)
  assert killed.returncode == -9, killed.stderr
  assert paths.exists(store.path("ckpt"))  # partly uploaded
  assert not (store.path("ckpt") / outputs.COMMIT_MARKER).exists()
  for read in (checkpoints.load, checkpoints.resolve, checkpoints.stored_arrays):
    with pytest.raises(checkpoints.CheckpointError, match="incomplete"):
      read(url)
  (temporary,) = [p for p in paths.as_path(store.root).iterdir() if ".tmp-" in p.name]
  assert (temporary / outputs.PUBLISHING).exists()
  removed = outputs.remove_stale_temporaries(url)
  assert [str(r) for r in removed] == [str(temporary)]
  _assert_same_params(checkpoints.load(url)[1], params)
  assert _no_temporaries(store.root)


def _upload(directory, url: str) -> str:
  """Every file below `directory` copied to `url` (each a local path or a URL); returns `url`."""
  for parts in paths.files_below(directory):
    target = paths.as_path(url).joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.copy_file(directory.joinpath(*parts), target)
  return url


# ---- converters ---------------------------------------------------------------------------------

def test_hf_to_maxnucl_with_urls_equals_local_paths_and_leaves_input_unchanged(
    hf_dir, store, tmp_path):
  hf_url = _upload(hf_dir, store.url(hf_dir.name))  # the name is the config's name
  before = _checksums(hf_url)
  convert.hf_to_maxnucl(hf_dir, tmp_path / "local")
  convert.hf_to_maxnucl(hf_url, store.url("url"))
  assert _checksums(hf_url) == before
  assert _content(store.url("url")) == _content(tmp_path / "local")
  assert (store.path("url") / outputs.COMMIT_MARKER).is_file()
  _assert_same_params(checkpoints.load(store.url("url"))[1],
                      checkpoints.load(tmp_path / "local")[1])


def test_maxnucl_to_hf_with_urls_equals_local_paths_and_leaves_input_unchanged(
    local_ckpt, store, tmp_path):
  path, _ = local_ckpt
  url_input = store.url("input")
  checkpoints.save(url_input, TINY, local_ckpt[1])
  before = _checksums(url_input)
  files = convert.maxnucl_to_hf(url_input, store.url("url"), max_shard_bytes=1 << 15)
  convert.maxnucl_to_hf(path, tmp_path / "local", max_shard_bytes=1 << 15)
  assert _checksums(url_input) == before
  assert len(files) > 1 and all(str(f).startswith(store.root) for f in files)
  assert _content(store.url("url")) == _content(tmp_path / "local")  # byte for byte
  assert (store.path("url") / outputs.COMMIT_MARKER).is_file()
  # and back, reading the sharded safetensors from the URL
  convert.hf_to_maxnucl(store.url("url"), store.url("back"))
  _assert_same_params(checkpoints.load(store.url("back"))[1], local_ckpt[1])


def test_gguf_from_a_bucket_to_a_bucket_equals_local_paths(gcs_bucket, tmp_path):
  import gguf_files  # pylint: disable=import-outside-toplevel
  from maxnucl.conversion import gguf_import  # pylint: disable=import-outside-toplevel
  local = tmp_path / "model.gguf"
  gguf_files.write_gguf(local, gguf_files.SHAPES["llama"])
  url = gcs_bucket + "/in/model.gguf"
  paths.copy_file(local, paths.as_path(url))
  gguf_import.gguf_to_maxnucl(local, tmp_path / "ckpt")
  gguf_import.gguf_to_maxnucl(url, gcs_bucket + "/ckpt")
  assert _content(gcs_bucket + "/ckpt") == _content(tmp_path / "ckpt")
  _assert_same_params(checkpoints.load(gcs_bucket + "/ckpt")[1],
                      checkpoints.load(tmp_path / "ckpt")[1])
  with pytest.raises(gguf_import.ConversionError, match="no such file"):
    gguf_import.gguf_to_maxnucl(gcs_bucket + "/in/missing.gguf", gcs_bucket + "/other")


# ---- pruner -------------------------------------------------------------------------------------

def test_pruning_with_urls_equals_local_paths_and_leaves_input_unchanged(local_ckpt, store,
                                                                         tmp_path):
  path, params = local_ckpt
  url_input = store.url("input")
  checkpoints.save(url_input, TINY, params)
  before = _checksums(url_input)
  kwargs = dict(method="entropy", ratio=0.25, layers="odd")
  local = prune_ffn_neurons(path, tmp_path / "local", report_path=tmp_path / "local.json",
                            **kwargs)
  url = prune_ffn_neurons(url_input, store.url("url"),
                          report_path=store.url("url.json"), **kwargs)
  assert _checksums(url_input) == before
  assert [e["kept"] for e in url["layers"]] == [e["kept"] for e in local["layers"]]
  assert json.loads(store.path("url.json").read_text())["output"] == store.url("url")
  cfg_url, from_url = checkpoints.load(store.url("url"))
  cfg_local, from_local = checkpoints.load(tmp_path / "local")
  assert cfg_url == cfg_local and cfg_url.layer_ffn_widths != TINY.layer_ffn_widths
  _assert_same_params(from_url, from_local)
  assert _no_temporaries(store.root)


# ---- evaluator ----------------------------------------------------------------------------------

def _evaluate(checkpoint, output, doc, *extra):
  """`python -m maxnucl.evaluate` (perplexity of `doc`) on `checkpoint` into `output`: its exit
  status, and what it printed."""
  from maxnucl import evaluate  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  try:
    code = evaluate.main(["--gin_file=gin/eval/perplexity.gin",
                          "--gin_param=perplexity.seq_len = 64",
                          f"--gin_param=perplexity.source = '{doc}'", "--batch_size", "4",
                          f"--checkpoint={checkpoint}", f"--output={output}", "--no_progress",
                          *extra])
  finally:
    gin.clear_config()
  return code


def test_evaluation_into_a_bucket_writes_what_a_local_output_holds(local_ckpt, tmp_path,
                                                                   gcs_server, gcs_bucket, capsys):
  """`--output gs://...`: the files of a local --output (and the commit marker), read back
  through the URL; an existing one is refused without --overwrite (naming it, left as it was)
  and replaced with it."""
  path, _ = local_ckpt
  doc = tmp_path / "doc.txt"
  doc.write_text("Outgoing connections of feed-forward neurons.\n" * 5)
  url = f"{gcs_bucket}/runs/eval"
  assert _evaluate(path, tmp_path / "local", doc) == 0
  capsys.readouterr()
  assert _evaluate(path, url, doc) == 0
  assert f"results:     {url}/{core.RESULTS}" in capsys.readouterr().out.splitlines()
  assert gcs_server.object_names(gcs_bucket) == sorted(
      f"runs/eval/{name}" for name in (core.RUN, core.PREDICTIONS, core.RESULTS,
                                       outputs.COMMIT_MARKER))
  assert outputs.is_committed(paths.as_path(url))
  remote, local = paths.as_path(url), tmp_path / "local"
  written = json.loads((remote / core.RESULTS).read_text())
  expected = json.loads((local / core.RESULTS).read_text())
  assert written["metrics"] == expected["metrics"] and written["num_examples"] == 4
  assert (remote / core.PREDICTIONS).read_text() == (local / core.PREDICTIONS).read_text()
  assert (remote / core.RUN).read_text() == (local / core.RUN).read_text()

  results = (remote / core.RESULTS).read_bytes()
  assert _evaluate(path, url, doc) == 2
  assert capsys.readouterr().err == (f"error: output {url} already exists; pass --overwrite "
                                     f"(overwrite=True) to replace it\n")
  assert (remote / core.RESULTS).read_bytes() == results
  assert _evaluate(path, url, doc, "--limit", "2", "--overwrite") == 0
  replaced = json.loads((remote / core.RESULTS).read_text())
  assert replaced["num_examples"] == 2 and replaced["num_resumed"] == 0
  assert len((remote / core.PREDICTIONS).read_text().splitlines()) == 2
  assert outputs.is_committed(paths.as_path(url))
  assert len(gcs_server.object_names(gcs_bucket)) == 4


def test_written_to_a_url_publishes_results_after_the_predictions_and_nothing_on_error(
    tmp_path, monkeypatch):
  url = _url(tmp_path / "eval")
  with pytest.raises(RuntimeError, match="interrupted"):
    with core.written_to(url) as folder:
      (folder / core.PREDICTIONS).write_text("{}\n")
      raise RuntimeError("interrupted")
  assert not (tmp_path / "eval").exists()
  copied = []
  copy_file = paths.copy_file
  monkeypatch.setattr(paths, "copy_file", lambda source, target: (
      copied.append(target.name), copy_file(source, target)))
  with core.written_to(url) as folder:
    assert not paths.is_url(folder)
    for name in (core.RESULTS, core.PREDICTIONS, "zz_extra.txt", core.RUN):
      (folder / name).write_text(name)
  assert copied == ["zz_extra.txt", core.RUN, core.PREDICTIONS, core.RESULTS]
  assert (tmp_path / "eval" / outputs.COMMIT_MARKER).is_file()
  assert (tmp_path / "eval" / core.RESULTS).read_text() == core.RESULTS


def test_evaluation_output_url_equal_to_or_inside_the_checkpoint_is_refused(
    local_ckpt, tmp_path, capsys):
  path, params = local_ckpt
  checkpoint = _url(tmp_path / "ckpt")
  checkpoints.save(checkpoint, TINY, params)
  before = _checksums(tmp_path / "ckpt")
  doc = tmp_path / "doc.txt"
  doc.write_text("Outgoing connections of feed-forward neurons.\n" * 5)
  for output, relation in [(checkpoint, "is"), (checkpoint + "/eval", "lies inside"),
                           (_url(path / "eval"), "lies inside")]:  # a local checkpoint's URL
    source = checkpoint if output.startswith(checkpoint) else path
    assert _evaluate(source, output, doc, "--overwrite") == 2
    assert f"--output {output} {relation} the checkpoint " in capsys.readouterr().err
  assert _checksums(tmp_path / "ckpt") == before
  assert not (path / "eval").exists()
  assert _evaluate(path, _url(path.parent), doc, "--overwrite") == 2  # replacing would delete it
  assert "contains the checkpoint" in capsys.readouterr().err


# ---- trainer ------------------------------------------------------------------------------------

TRAIN = ["model_config.num_layers = 2", "DATA_SEQ_LEN = 32", "DATA_BATCH_SIZE = 8",
         "train_loop.progress_bar = False", "train_loop.eval_every = 0",
         "train_loop.log_every = 1", "train_loop.checkpoint_every = 2",
         "train_loop.async_checkpointing = False"]


def _train(workdir, steps, extra=()):
  from maxnucl import gin_config, sharding, train  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_config.parse(["gin/demo_cpu.gin"], TRAIN + [f"train_loop.num_steps = {steps}", *extra])
  try:
    return train.train_loop(workdir, mesh=sharding.create_mesh((1, 1, 1),
                                                               devices=jax.devices()[:1]))
  finally:
    gin.clear_config()


def test_training_in_a_file_url_workdir_resumes_as_in_a_local_one(tmp_path):
  workdir = _url(tmp_path / "run")
  _train(workdir, 2)
  resumed = _train(workdir, 3)
  straight = _train(tmp_path / "local", 3)
  assert str(resumed["workdir"]) == workdir
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
  assert [r["step"] for r in logged] == [1, 2, 3]
  assert [r["loss"] for r in logged] == [json.loads(line)["loss"] for line in (
      tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
  assert (tmp_path / "run" / "config.gin").is_file()
  assert (tmp_path / "run" / "operative_config.gin").is_file()
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
  latest = checkpoints.resolve(workdir)
  assert str(latest) == workdir + "/checkpoints/3"
  assert (tmp_path / "run" / "checkpoints" / "3" / outputs.COMMIT_MARKER).is_file()
  _assert_same_params(checkpoints.load(latest)[1],
                      jax.device_get(straight["state"]["params"]))


EVAL_TASKS = ["import maxnucl.evaluation.gsm8k", "train_loop.eval_tasks = ['gsm8k']",
              "train_loop.eval_tasks_limit = 4", "gsm8k.source = 'synthetic_arithmetic'",
              "gsm8k.num_shots = 0", "gsm8k.max_new_tokens = 8"]


def test_eval_tasks_in_a_file_url_workdir_write_what_a_local_one_does(tmp_path):
  url_run = _train(_url(tmp_path / "run"), 2, EVAL_TASKS)
  local_run = _train(tmp_path / "local", 2, EVAL_TASKS)
  assert url_run["history"][-1]["synthetic_arithmetic/accuracy_strict"] == (
      local_run["history"][-1]["synthetic_arithmetic/accuracy_strict"])
  written = tmp_path / "run" / "eval" / "synthetic_arithmetic" / "step_2"
  expected = tmp_path / "local" / "eval" / "synthetic_arithmetic" / "step_2"
  assert sorted(p.name for p in written.iterdir()) == sorted(
      [core.RUN, core.PREDICTIONS, core.RESULTS, outputs.COMMIT_MARKER])
  assert written.joinpath(core.PREDICTIONS).read_text() == (
      expected.joinpath(core.PREDICTIONS).read_text())
  assert written.joinpath(core.RUN).read_text() == expected.joinpath(core.RUN).read_text()
  results = json.loads(written.joinpath(core.RESULTS).read_text())
  assert results["metrics"] == json.loads(expected.joinpath(core.RESULTS).read_text())["metrics"]
  assert results["num_examples"] == 4


def _corrupt(step_dir) -> None:
  """Flip bytes of the largest params data file (the arrays' chunks) of a step (a local path or
  a URL)."""
  step_dir = paths.as_path(step_dir)
  chunks = [step_dir.joinpath("params", *parts) for parts in paths.files_below(step_dir / "params")
            if len(parts) > 1 and parts[-2] == "d"]
  data = max(chunks, key=paths.file_size)
  raw = bytearray(data.read_bytes())
  for i in range(len(raw) // 3, len(raw), 97):
    raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))


def _without_marker(sums: dict) -> dict:
  return {k: v for k, v in sums.items() if k != outputs.COMMIT_MARKER}


def _names(directory) -> list[str]:
  return sorted(p.name for p in paths.as_path(directory).iterdir())


@pytest.mark.own_process  # Orbax leaves reads of the corrupted step running
def test_a_corrupted_step_in_a_url_workdir_is_copied_aside_marked_then_deleted(store, caplog):
  """A bucket has no rename: the corrupted step is copied to corrupted_step_4, the copy gets its
  commit marker, and only then is step 4 deleted; the run resumes from step 2."""
  workdir, steps = store.url("run"), store.path("run") / "checkpoints"
  _train(workdir, 4)
  _corrupt(steps / "4")
  corrupted = _checksums(steps / "4")
  _train(workdir, 3)  # resumes from step 2 and stops at step 3: no new step 4
  aside = steps / "corrupted_step_4"
  assert _without_marker(_checksums(aside)) == _without_marker(corrupted)  # every file, as it was
  assert outputs.is_committed(aside)  # the copy is marked complete
  assert not paths.exists(steps / "4")  # and only then the original deleted
  assert _names(steps) == ["2", "3", "corrupted_step_4"]
  assert f"moved it to {aside} and resuming from the previous checkpoint, step 2" in caplog.text


@pytest.mark.own_process  # Orbax leaves reads of the corrupted step running
def test_a_second_corrupted_step_of_the_same_number_goes_to_the_next_free_name(store):
  workdir, steps = store.url("run"), store.path("run") / "checkpoints"
  _train(workdir, 4)
  _corrupt(steps / "4")
  first = _checksums(steps / "4")
  _train(workdir, 3)  # step 4 -> corrupted_step_4
  _train(workdir, 4)  # a new step 4
  _corrupt(steps / "4")
  second = _checksums(steps / "4")
  _train(workdir, 4)  # step 4 again -> corrupted_step_4.2, resumed from step 3
  assert _without_marker(_checksums(steps / "corrupted_step_4")) == _without_marker(first)
  assert _without_marker(_checksums(steps / "corrupted_step_4.2")) == _without_marker(second)
  assert outputs.is_committed(steps / "corrupted_step_4.2")
  assert first != second


@pytest.mark.own_process  # Orbax leaves reads of the corrupted step running
def test_a_failure_while_copying_a_corrupted_step_aside_leaves_the_step_in_place(store,
                                                                              monkeypatch):
  """The copy fails after some files: the original step stays whole (marker included), the
  partial copy is removed, and the next run moves the step aside normally."""
  workdir, steps = store.url("run"), store.path("run") / "checkpoints"
  _train(workdir, 4)
  _corrupt(steps / "4")
  original = _checksums(steps / "4")
  copy_file, copied = paths.copy_file, []

  def failing_copy(source, target):
    if len(copied) == 3:
      raise OSError(5, "simulated failure while copying", str(target))
    copy_file(source, target)
    copied.append(target)

  monkeypatch.setattr(paths, "copy_file", failing_copy)
  with pytest.raises(OSError, match="simulated failure while copying"):
    _train(workdir, 3)
  assert len(copied) == 3  # it failed part-way through the copy
  assert _checksums(steps / "4") == original  # never delete the only copy
  assert not paths.exists(steps / "corrupted_step_4")  # the partial copy is gone
  monkeypatch.setattr(paths, "copy_file", copy_file)
  _train(workdir, 3)
  assert _without_marker(_checksums(steps / "corrupted_step_4")) == _without_marker(original)
  assert not paths.exists(steps / "4")


@pytest.mark.parametrize("as_url", [False, True])
def test_move_aside_takes_the_first_free_name(tmp_path, as_url):
  """Locally one rename, for a URL a marked copy; either way to `name`, `name.2`, ..."""
  for n in (1, 2, 3):
    (tmp_path / "step" / "sub").mkdir(parents=True)
    (tmp_path / "step" / "sub" / "data").write_text(f"step {n}")
    (tmp_path / "step" / outputs.COMMIT_MARKER).write_text("done")
    source = _url(tmp_path / "step") if as_url else tmp_path / "step"
    moved = outputs.move_aside(source, "aside")
    assert str(moved) == str(source).replace("/step", "/aside" + ("" if n == 1 else f".{n}"))
    assert not (tmp_path / "step").exists()
  for n, name in [(1, "aside"), (2, "aside.2"), (3, "aside.3")]:
    assert (tmp_path / name / "sub" / "data").read_text() == f"step {n}"
    assert (tmp_path / name / outputs.COMMIT_MARKER).is_file()


def test_training_in_a_bucket_killed_mid_run_resumes_bit_identically(gcs_bucket, tmp_path):
  """`python -m maxnucl.train --workdir gs://...` SIGKILLed once its step-4 checkpoint is
  committed, then run again: it resumes from the bucket, and its params, metrics and TensorBoard
  steps equal those of a run that was never interrupted."""
  workdir = gcs_bucket + "/run"
  command = [sys.executable, "-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin",
             *[f"--gin_param={p}" for p in TRAIN + ["train_loop.num_steps = 8"]],
             f"--workdir={workdir}"]
  marker = paths.as_path(workdir) / "checkpoints" / "4" / outputs.COMMIT_MARKER
  run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 600
    while not marker.exists():
      assert run.poll() is None, f"finished before it could be killed: {run.stderr.read()}"
      assert time.monotonic() < deadline, "no committed step 4 in 600 s"
      time.sleep(0.2)
  finally:
    run.kill()
  assert run.wait(timeout=60) == -9
  resumed = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  assert resumed.returncode == 0, resumed.stderr
  local = tmp_path / "local"  # the same command, never interrupted, in a local workdir
  straight = subprocess.run(command[:-1] + [f"--workdir={local}"], capture_output=True,
                            text=True, timeout=900, check=False)
  assert straight.returncode == 0, straight.stderr
  assert str(checkpoints.resolve(workdir)) == workdir + "/checkpoints/8"
  _assert_same_params(checkpoints.load(checkpoints.resolve(workdir))[1],
                      checkpoints.load(checkpoints.resolve(local))[1])
  logged = [json.loads(line) for line in
            (paths.as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == list(range(1, 9))
  assert [r["loss"] for r in logged] == [json.loads(line)["loss"] for line in
                                         (local / "metrics.jsonl").read_text().splitlines()]
  events = _upload(paths.as_path(workdir) / "tensorboard", str(tmp_path / "events"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(events)
  accumulator.Reload()
  assert sorted({e.step for e in accumulator.Scalars("loss")}) == list(range(1, 9))


# ---- tools/tpu_vm.py's remote commands ----------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parent.parent
WHERE = ["--name", "nucl", "--zone", "us-west4-a", "--project", "my-proj"]


def _worker_command(capsys, command: str, program_args) -> str:
  """The shell command that `tools/tpu_vm.py COMMAND ... --dry_run -- PROGRAM_ARGS` has every
  worker run: the `--command=` of the one `gcloud ... tpu-vm ssh` call it prints."""
  from maxnucl import tpu_vm  # pylint: disable=import-outside-toplevel
  capsys.readouterr()
  assert tpu_vm.main([command, *WHERE, "--dry_run", "--", *program_args]) == 0
  [line] = capsys.readouterr().out.splitlines()
  [remote] = [a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--command=")]
  return remote


def _worker_home(tmp_path) -> pathlib.Path:
  """A home directory laid out as `tpu_vm.py setup` leaves a worker's: ~/maxnucl is the checkout
  (a link to this one) and ~/maxnucl_venv/bin/python runs the interpreter of these tests."""
  home = tmp_path / "home"
  (home / "maxnucl_venv" / "bin").mkdir(parents=True)
  (home / "maxnucl").symlink_to(REPO)
  python = home / "maxnucl_venv" / "bin" / "python"
  python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  python.chmod(0o755)
  return home


def _on_the_worker(remote: str, home: pathlib.Path) -> str:
  """`remote` run by bash with HOME=`home`, as sshd runs it on a worker (the emulator's
  environment inherited); what it printed, after asserting that it succeeded."""
  done = subprocess.run(["bash", "-c", remote], env={**os.environ, "HOME": str(home)},
                        capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, (remote, done.stdout[-3000:], done.stderr[-3000:])
  return done.stdout


def test_tpu_vm_train_and_run_commands_write_their_outputs_into_the_bucket(
    gcs_server, gcs_bucket, capsys, tmp_path):
  """The remote commands of `tpu_vm.py train -- ... --workdir=gs://...` and of `tpu_vm.py run --
  tools/prune_checkpoint.py --input gs://... --output gs://...`, taken verbatim from --dry_run,
  run by bash as on a worker.  The one adaptation to this machine is the worker's home directory
  (HOME), laid out as `setup` leaves it (`_worker_home`: the checkout and the venv's python);
  the commands and the user's arguments are not changed.  The trainer's checkpoints (each with
  its commit marker), metrics.jsonl and TensorBoard events land in the bucket, its log in
  ~/maxnucl_logs/train.log; the pruner reads the trainer's step from the bucket and publishes the
  checkpoint a local output of the same pruning holds."""
  home = _worker_home(tmp_path)
  workdir = gcs_bucket + "/runs/tiny"
  train = _worker_command(capsys, "train", [
      "--gin_file=gin/demo_cpu.gin", *[f"--gin_param={p}" for p in TRAIN],
      "--gin_param=train_loop.num_steps = 4", f"--workdir={workdir}"])
  printed = _on_the_worker(train, home)
  log = (home / "maxnucl_logs" / "train.log").read_text()
  assert log and log == printed  # tee: the log and this terminal
  objects = gcs_server.object_names(gcs_bucket)
  for step in (2, 4):
    assert f"runs/tiny/checkpoints/{step}/{outputs.COMMIT_MARKER}" in objects
  assert "runs/tiny/metrics.jsonl" in objects
  assert any(name.startswith("runs/tiny/tensorboard/") for name in objects)
  logged = [json.loads(line) for line in
            (paths.as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  assert str(checkpoints.resolve(workdir)) == workdir + "/checkpoints/4"

  step, pruned = workdir + "/checkpoints/4", gcs_bucket + "/ckpt/tiny_entropy25"
  prune = _worker_command(capsys, "run", [
      "tools/prune_checkpoint.py", "--input", step, "--output", pruned, "--method", "entropy",
      "--ratio", "0.25"])
  _on_the_worker(prune, home)
  assert (home / "maxnucl_logs" / "prune_checkpoint.log").stat().st_size > 0
  assert outputs.is_committed(paths.as_path(pruned))
  prune_ffn_neurons(step, tmp_path / "local", method="entropy", ratio=0.25)
  assert _content(pruned) == _content(tmp_path / "local")
  assert checkpoints.load_config(pruned).layer_ffn_widths == tuple(
      w - w // 4 for w in checkpoints.load_config(step).layer_ffn_widths)




CLOSED_WRITER = """
import os, sys, urllib.request
from tensorboardX import SummaryWriter
from maxnucl import paths
writer = SummaryWriter(paths.tensorboard_logdir(sys.argv[1]))
writer.add_scalar("loss", 1.5, 1)
writer.flush()
writer.add_scalar("loss", 1.25, 2)
writer.close()
[events] = paths.as_path(sys.argv[1]).iterdir()
with open(sys.argv[2] + "/" + events.name, "wb") as f:  # the events as of close
  f.write(events.read_bytes())
events.unlink()
bucket = sys.argv[1][len("gs://"):].split("/")[0]  # and the bucket deleted: a write now fails
urllib.request.urlopen(urllib.request.Request(
    os.environ["STORAGE_EMULATOR_HOST"] + "/storage/v1/b/" + bucket, method="DELETE"))
"""


def test_a_closed_tensorboard_writer_in_a_bucket_uploads_nothing_more(gcs_bucket, tmp_path):
  """A TensorBoard writer in a bucket (the trainer's, `paths.tensorboard_logdir`): its event
  file holds every step at close, and once closed nothing writes it again, not even at the
  process's exit: with the bucket deleted after close, the process exits without a failed
  upload (tensorboardX's own GCS writer uploads again whenever the writer object is
  garbage-collected: a second upload, an error, or a two-minute wait at exit if the server is
  gone)."""
  done = subprocess.run([sys.executable, "-c", CLOSED_WRITER, gcs_bucket + "/tb", str(tmp_path)],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert "Exception ignored" not in done.stderr, done.stderr  # no write after close, at exit
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(1, 1.5), (2, 1.25)]
