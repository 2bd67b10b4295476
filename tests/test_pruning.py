"""Structured FFN neuron pruning (maxnucl.pruning, tools/prune_checkpoint.py) as specifications."""

import hashlib
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from maxnucl import checkpoints, models
from maxnucl.pruning import calibration, prune_ffn_neurons, register, select_layers
from maxnucl.pruning.prune import PruningError
from maxnucl.pruning.scores import METHODS

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = models.get_config("gemma2_tiny")
SEQ = 17


def _tokens(seed, rows=4):
  return np.random.default_rng(seed).integers(3, TINY.vocab_size, size=(rows, SEQ))


def random_params(cfg, seed):
  """Random numpy params of the right shapes (faster than compiling models.init per config)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[0]))
                      .astype(np.float32), models.abstract_params(cfg))


_apply = jax.jit(models.apply, static_argnums=0)


def synthetic_batches():
  """A synthetic calibration generator (the library accepts any iterable of batch dicts)."""
  for seed in range(4):
    yield {"tokens": _tokens(seed)}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  params = random_params(TINY, 0)
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoints.save(path, TINY, params)
  return path, params


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory):
  path = tmp_path_factory.mktemp("calib") / "calib.npy"
  np.save(path, np.concatenate([_tokens(s) for s in range(4)]))
  return path


def _logits(cfg, params, seed=99):
  return np.asarray(_apply(cfg, params, jnp.asarray(_tokens(seed, rows=2))))


def _zero_removed(params, report):
  zeroed = jax.tree.map(np.array, params)
  for layer in report["layers"]:
    removed = np.setdiff1d(np.arange(layer["width_before"]), layer["kept"])
    zeroed[layer["name"]]["mlp"]["out"][removed] = 0.0
  return zeroed


def _checksums(path):
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(path).rglob("*")) if p.is_file()}


# ---- identities -------------------------------------------------------------------------------------

def test_ratio_zero_gives_identical_checkpoint(tiny_ckpt, tmp_path):
  path, params = tiny_ckpt
  report = prune_ffn_neurons(path, tmp_path / "out", method="entropy", ratio=0.0)
  cfg, pruned = checkpoints.load(tmp_path / "out")
  assert cfg == TINY
  assert report["num_removed"] == 0
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, pruned))


@pytest.mark.parametrize("method", ["entropy", "magnitude", "random", "wanda_channel", "flap",
                                    "lp", "scar_prot"])
def test_non_compensating_pruning_equals_zeroing_removed_rows(tiny_ckpt, tmp_path, method):
  path, params = tiny_ckpt
  needs_data = METHODS[method].needs_calibration
  report = prune_ffn_neurons(path, tmp_path / "out", method=method, ratio=0.25, seed=3,
                             calibration=synthetic_batches if needs_data else None)
  cfg, pruned = checkpoints.load(tmp_path / "out")
  assert cfg.ffn_widths == (192,) * 4
  for layer in report["layers"]:
    assert layer["num_removed"] == 64 and layer["kept"] == sorted(layer["kept"])
    assert pruned[layer["name"]]["mlp"]["out"].shape == (192, TINY.d_model)
    assert pruned[layer["name"]]["mlp"]["gate"].shape == (TINY.d_model, 192)
  np.testing.assert_allclose(_logits(cfg, pruned), _logits(TINY, _zero_removed(params, report)),
                             rtol=1e-5, atol=1e-5)


# ---- choices equal an independent numpy reference ----------------------------------------------

def _reference_removed(scores, count, highest):
  order = np.argsort(-scores if highest else scores, kind="stable")
  return set(order[:count].tolist())


@pytest.mark.parametrize("method", ["entropy", "magnitude"])
def test_data_free_choice_matches_numpy_reference(tiny_ckpt, tmp_path, method):
  path, params = tiny_ckpt
  report = prune_ffn_neurons(path, tmp_path / "out", method=method, ratio=0.3)
  for layer in report["layers"]:
    w = params[layer["name"]]["mlp"]["out"].astype(np.float64)
    if method == "entropy":  # scipy normalises |W_j| to a distribution itself
      scores, highest = scipy.stats.entropy(np.abs(w), axis=1), True
    else:
      scores, highest = (w ** 2).sum(1), False
    expected = _reference_removed(scores, math.floor(0.3 * 256), highest)
    assert set(range(256)) - set(layer["kept"]) == expected


def test_entropy_removes_zero_rows_first(tmp_path):
  cfg = TINY.replace(num_layers=2)
  params = random_params(cfg, 1)
  params["layers_0"]["mlp"]["out"][[5, 77]] = 0.0
  checkpoints.save(tmp_path / "in", cfg, params)
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="entropy", ratio=0.01,
                             layers="0")
  assert report["layers"][0]["removed_order"] == [5, 77]


# ---- compensating methods are lossless on constructed redundancy -------------------------------

def _save_constructed(tmp_path, build):
  params = random_params(TINY, 2)
  for name in models.ffn_layer_names(TINY):
    build(params[name]["mlp"])
  checkpoints.save(tmp_path / "in", TINY, params)
  return params


def test_srinivas_babu_is_lossless_on_duplicated_neurons(tmp_path):
  def duplicate(mlp):
    # Neuron 192 + k duplicates neuron k: same gate column, up column scaled by 2 (the scale is
    # folded into W on merge), its own outgoing row.
    mlp["gate"][:, 192:] = mlp["gate"][:, :64]
    mlp["up"][:, 192:] = 2.0 * mlp["up"][:, :64]

  params = _save_constructed(tmp_path, duplicate)
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="srinivas_babu",
                             ratio=0.25)
  cfg, pruned = checkpoints.load(tmp_path / "out")
  assert cfg.ffn_widths == (192,) * 4
  for layer in report["layers"]:  # exactly one neuron of every duplicated pair went
    removed = set(range(256)) - set(layer["kept"])
    assert {r % 192 for r in removed} == set(range(64))
  np.testing.assert_allclose(_logits(cfg, pruned), _logits(TINY, params), rtol=1e-4, atol=1e-4)


def test_stahlberg_byrne_is_lossless_on_linear_combinations(tmp_path):
  def combine(mlp):
    # GLU construction: a_j = act(x U_j) * (x V_j).  Groups of 4 neurons share one gate column,
    # and neuron 4g+3's up column is 0.7 V_{4g} - 1.3 V_{4g+1}; then a_{4g+3} = 0.7 a_{4g} -
    # 1.3 a_{4g+1} for every input (the gate factor is common), so one neuron per group can be
    # removed exactly by W_k += lambda_k W_j.  Without shared gates no such identity exists.
    for g in range(64):
      mlp["gate"][:, 4 * g + 1:4 * g + 4] = mlp["gate"][:, 4 * g:4 * g + 1]
      mlp["up"][:, 4 * g + 3] = 0.7 * mlp["up"][:, 4 * g] - 1.3 * mlp["up"][:, 4 * g + 1]

  params = _save_constructed(tmp_path, combine)
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="stahlberg_byrne",
                             ratio=0.25)
  cfg, pruned = checkpoints.load(tmp_path / "out")
  assert cfg.ffn_widths == (192,) * 4
  for layer in report["layers"]:
    removed = set(range(256)) - set(layer["kept"])
    assert sorted({r // 4 for r in removed}) == list(range(64))
  np.testing.assert_allclose(_logits(cfg, pruned), _logits(TINY, params), rtol=1e-4, atol=1e-4)


# ---- layer selection and budgets ---------------------------------------------------------------

def test_layer_groups_select_the_right_layers():
  cfg = TINY.replace(num_layers=6)
  assert select_layers(cfg, "all") == [0, 1, 2, 3, 4, 5]
  assert select_layers(cfg, "bottom_half") == [0, 1, 2]
  assert select_layers(cfg, "top_half") == [3, 4, 5]
  assert select_layers(cfg, "even") == [0, 2, 4]
  assert select_layers(cfg, "odd") == [1, 3, 5]
  assert select_layers(cfg, "4,1") == [1, 4]
  no_ffn = cfg.replace(ffn_widths=(256, 0, 256, 0, 256, 256))
  assert select_layers(no_ffn, "odd") == [5]
  for bad in ("7", "1,x", "1"):
    with pytest.raises(PruningError, match="--layers"):
      select_layers(no_ffn, bad)


def test_layer_selection_prunes_only_selected_layers(tiny_ckpt, tmp_path):
  path, params = tiny_ckpt
  report = prune_ffn_neurons(path, tmp_path / "out", method="magnitude", ratio=0.5,
                             layers="bottom_half")
  cfg, pruned = checkpoints.load(tmp_path / "out")
  assert cfg.ffn_widths == (128, 128, 256, 256)
  assert [layer["selected"] for layer in report["layers"]] == [True, True, False, False]
  for name in ("layers_2", "layers_3"):
    jax.tree.map(np.testing.assert_array_equal, params[name],
                 jax.tree.map(np.asarray, pruned[name]))


def test_global_budget_removes_the_right_total(tiny_ckpt, tmp_path):
  path, params = tiny_ckpt
  report = prune_ffn_neurons(path, tmp_path / "out", method="entropy", ratio=0.3,
                             budget="global")
  total = math.floor(0.3 * 4 * 256)
  assert report["num_removed"] == total
  entropies = np.concatenate([scipy.stats.entropy(np.abs(params[f"layers_{i}"]["mlp"]["out"]
                                                         .astype(np.float64)), axis=1)
                              for i in range(4)])
  removed = np.argsort(-entropies, kind="stable")[:total]
  expected = np.bincount(removed // 256, minlength=4)
  assert [layer["num_removed"] for layer in report["layers"]] == expected.tolist()
  cfg, _ = checkpoints.load(tmp_path / "out")
  assert list(cfg.ffn_widths) == (256 - expected).tolist()


# ---- calibration -------------------------------------------------------------------------------------

def test_loss_proxy_matches_apply_with_ffn_gradient(tiny_ckpt):
  _, params = tiny_ckpt
  batch = next(calibration.iterate_batches(synthetic_batches, num_examples=4))
  stats = calibration.collect_stats(TINY, params, [batch])
  names = models.ffn_layer_names(TINY)

  def loss(scale):
    logits, _ = models.apply_with_ffn(TINY, params, batch["tokens"], ffn_inner_scale=scale)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1))

  ones = {n: jnp.ones(batch["tokens"].shape + (256,)) for n in names}
  grads = jax.grad(loss)(ones)
  for n in names:
    expected = 0.5 * np.mean(np.asarray(grads[n]) ** 2, axis=(0, 1))
    np.testing.assert_allclose(stats[n].loss_proxy, expected, rtol=1e-4, atol=1e-12)


def test_npy_jsonl_and_generator_sources_give_the_same_statistics(tiny_ckpt, calib_npy,
                                                                 tmp_path):
  _, params = tiny_ckpt
  jsonl = tmp_path / "calib.jsonl"
  jsonl.write_text("".join(json.dumps({"tokens": row.tolist()}) + "\n"
                           for row in np.load(calib_npy)))
  results = [calibration.collect_stats(TINY, params, calibration.iterate_batches(
      source, num_examples=16, batch_size=4)) for source in (calib_npy, jsonl, synthetic_batches)]
  for other in results[1:]:
    for n, st in results[0].items():
      assert st.count == other[n].count == 16 * (SEQ - 1)
      np.testing.assert_allclose(st.loss_proxy, other[n].loss_proxy, rtol=1e-5)


def test_data_aware_method_with_file_calibration_reports_perplexity(tiny_ckpt, calib_npy,
                                                                    tmp_path):
  path, _ = tiny_ckpt
  report = prune_ffn_neurons(path, tmp_path / "out", method="scar_prot", ratio=0.5,
                             calibration=calib_npy, calibration_examples=8,
                             eval_perplexity=calib_npy, eval_examples=8,
                             report_path=tmp_path / "report.json")
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["method_params"]["supernode_fraction"] == 0.01
  assert saved["calibration"]["tokens"] == 8 * (SEQ - 1)
  ppl = saved["perplexity"]
  assert ppl["before"]["perplexity"] > 1 and ppl["after"]["perplexity"] > 1
  assert ppl["before"]["tokens"] == ppl["after"]["tokens"] == 8 * (SEQ - 1)
  assert report["num_removed"] == 4 * 128


def test_scar_prot_never_removes_supernodes(tiny_ckpt):
  from maxnucl.pruning.scores import LayerInputs, supernodes  # pylint: disable=import-outside-toplevel
  _, params = tiny_ckpt
  stats = calibration.collect_stats(TINY, params, calibration.iterate_batches(
      synthetic_batches, num_examples=16))
  mlp = params["layers_1"]["mlp"]
  layer = LayerInputs(1, "layers_1", mlp["gate"], mlp["up"], mlp["out"], stats["layers_1"],
                      np.random.default_rng(0), dict(METHODS["scar_prot"].defaults))
  scores = METHODS["scar_prot"].fn(layer)
  core = supernodes(stats["layers_1"].loss_proxy, 0.01)
  assert core.size == 3 and np.all(np.isinf(scores[core]))
  assert np.all(scores >= stats["layers_1"].loss_proxy)  # protection factors are >= 1


def test_a_new_method_is_one_registered_function(tiny_ckpt, tmp_path):
  @register("test_first_neurons", remove="lowest")
  def first_neurons(layer):  # remove neurons 0, 1, 2, ...
    return np.arange(layer.width, dtype=np.float64)

  try:
    report = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="test_first_neurons",
                               ratio=0.25, layers="2")
  finally:
    del METHODS["test_first_neurons"]
  assert report["layers"][2]["kept"] == list(range(64, 256))


# ---- the input is never modified; invalid requests write nothing -----------------------------

def test_input_checkpoint_is_unchanged(tiny_ckpt, tmp_path):
  path, _ = tiny_ckpt
  before = _checksums(path)
  prune_ffn_neurons(path, tmp_path / "out", method="srinivas_babu", ratio=0.5)
  prune_ffn_neurons(path, tmp_path / "out", method="random", ratio=0.1, overwrite=True)
  assert _checksums(path) == before
  assert checkpoints.load_config(tmp_path / "out").ffn_widths == (231,) * 4


@pytest.mark.parametrize("kwargs, error, match", [
    ({"ratio": 1.0}, PruningError, r"--ratio 1.0: expected .* \[0, 1\)"),
    ({"ratio": -0.1}, PruningError, r"--ratio"),
    ({"method": "nope"}, PruningError, r"unknown pruning method 'nope'; known methods"),
    ({"method": "lp"}, PruningError, r"'lp' is data-aware and needs calibration"),
    ({"budget": "everything"}, PruningError, r"--budget"),
    ({"method_params": {"nope": 1}}, PruningError, r"has no parameter 'nope'"),
])
def test_invalid_requests_raise_and_write_nothing(tiny_ckpt, tmp_path, kwargs, error, match):
  args = dict(method="entropy", ratio=0.25) | kwargs
  with pytest.raises(error, match=match):
    prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", **args)
  assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_ckpt, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="--overwrite"):
    prune_ffn_neurons(tiny_ckpt[0], out, method="entropy", ratio=0.25)
  assert [p.name for p in out.iterdir()] == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_rejects_bad_ratio_and_existing_output(tiny_ckpt, tmp_path):
  tool = [sys.executable, str(REPO / "tools" / "prune_checkpoint.py"), "--input",
          str(tiny_ckpt[0]), "--method", "entropy"]
  bad = subprocess.run(tool + ["--output", str(tmp_path / "out"), "--ratio", "1.5"],
                       capture_output=True, text=True, cwd=REPO, check=False)
  assert bad.returncode == 2 and "--ratio 1.5" in bad.stderr
  assert not (tmp_path / "out").exists()
  ok = subprocess.run(tool + ["--output", str(tmp_path / "out"), "--ratio", "0.5", "--layers",
                              "0", "--report", str(tmp_path / "r.json")],
                      capture_output=True, text=True, cwd=REPO, check=False)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["ffn_widths_after"] == [128, 256, 256, 256]
  again = subprocess.run(tool + ["--output", str(tmp_path / "out"), "--ratio", "0.5"],
                         capture_output=True, text=True, cwd=REPO, check=False)
  assert again.returncode == 2 and "already exists" in again.stderr
  assert checkpoints.load_config(tmp_path / "out").ffn_widths == (128, 256, 256, 256)


# ---- analysis ----------------------------------------------------------------------------------

def test_analyze_ffn_writes_histograms_lp_concentration_and_overlap(tiny_ckpt, tmp_path):
  from maxnucl.pruning import analysis  # pylint: disable=import-outside-toplevel
  result = analysis.analyze_ffn(tiny_ckpt[0], tmp_path, methods=["entropy", "random", "lp"],
                                calibration=synthetic_batches, calibration_examples=8)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "analysis.json", "entropy_histograms.png", "lp_concentration.png", "overlap.png"]
  for hist in result["entropy"].values():
    assert sum(hist["counts"]) == 256
  for conc in result["lp_concentration"].values():
    assert conc["num_supernodes"] == 3 and 3 / 256 <= conc["share"] <= 1
  assert result["overlap"]["mean"]["entropy|entropy"] == 1.0
  sets = result["removal_sets"]
  assert result["overlap"]["per_layer"]["entropy|random"]["layers_0"] == pytest.approx(
      len(set(sets["entropy"]["layers_0"]) & set(sets["random"]["layers_0"]))
      / len(set(sets["entropy"]["layers_0"]) | set(sets["random"]["layers_0"])))
  assert analysis.jaccard([1, 2, 3], [2, 3, 4]) == 0.5


def test_analyze_ffn_reads_a_registered_task_live_or_cached(tiny_ckpt, tmp_path):
  from maxnucl.data import pipeline  # pylint: disable=import-outside-toplevel
  from maxnucl.pruning import analysis  # pylint: disable=import-outside-toplevel
  common = dict(methods=["lp"], calibration="synthetic_arithmetic", calibration_examples=8,
                seq_len=32, batch_size=4)
  live = analysis.analyze_ffn(tiny_ckpt[0], tmp_path / "live", **common)
  pipeline.cache_task("synthetic_arithmetic", "train", tmp_path / "cache", seq_len=32)
  cached = analysis.analyze_ffn(tiny_ckpt[0], tmp_path / "cached",
                                data_cache_dir=tmp_path / "cache", **common)
  assert cached["lp_concentration"] == live["lp_concentration"]
  assert cached["removal_sets"] == live["removal_sets"]


# ---- streaming, report, data sources -----------------------------------------------------------

def test_pruner_streams_layer_by_layer_in_the_stored_dtype(tmp_path, monkeypatch):
  from maxnucl.pruning import io  # pylint: disable=import-outside-toplevel
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(TINY, 4))
  checkpoints.save(tmp_path / "in", TINY, params)
  events = []
  read, write = io.CheckpointReader.read, checkpoints.StreamingWriter.write
  monkeypatch.setattr(io.CheckpointReader, "read",
                      lambda self, key: events.append(("read", key)) or read(self, key))
  monkeypatch.setattr(checkpoints.StreamingWriter, "write",
                      lambda self, key, a: events.append(("write", key)) or write(self, key, a))
  monkeypatch.setattr(io.CheckpointReader, "read_all", None)  # data-free: never the whole tree
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="magnitude", ratio=0.25)
  # Each layer's FFN is written before the next layer's FFN is read.
  ffn_events = [(kind, key[0]) for kind, key in events if key[1] == "mlp"]
  for i in range(TINY.num_layers - 1):
    assert ffn_events.index(("read", f"layers_{i + 1}")) > max(
        n for n, e in enumerate(ffn_events) if e == ("write", f"layers_{i}"))
  assert {dtype for _, dtype in checkpoints.stored_arrays(tmp_path / "out").values()} == {
      "bfloat16"}
  _, pruned = checkpoints.load(tmp_path / "out")
  kept = report["layers"][1]["kept"]
  np.testing.assert_array_equal(np.asarray(pruned["layers_1"]["mlp"]["out"]),
                                np.asarray(params["layers_1"]["mlp"]["out"])[kept])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["embedder"]),
               jax.tree.map(np.asarray, pruned["embedder"]))
  # The output (StreamingWriter's zarr layout) is itself a valid input; unselected tensors are
  # copied unchanged from either layout.
  prune_ffn_neurons(tmp_path / "out", tmp_path / "again", method="magnitude", ratio=0.5,
                    layers="0")
  cfg, again = checkpoints.load(tmp_path / "again")
  assert cfg.ffn_widths == (96, 192, 192, 192)
  for name in ("embedder", "layers_1", "layers_3", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pruned[name]),
                 jax.tree.map(np.asarray, again[name]))


def test_failure_while_writing_leaves_nothing(tiny_ckpt, tmp_path):
  @register("test_fails_on_layer_2", remove="lowest")
  def fails(layer):
    if layer.index == 2:
      raise RuntimeError("scoring failed")
    return np.arange(layer.width, dtype=np.float64)

  try:
    with pytest.raises(RuntimeError, match="scoring failed"):
      prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="test_fails_on_layer_2",
                        ratio=0.25)
  finally:
    del METHODS["test_fails_on_layer_2"]
  assert list(tmp_path.iterdir()) == []


def test_report_holds_kept_indices_counts_scores_and_parameters(tiny_ckpt, tmp_path):
  report = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="random", ratio=0.25,
                             layers="odd", seed=7, report_path=tmp_path / "r.json")
  saved = json.loads((tmp_path / "r.json").read_text())
  assert {k: saved[k] for k in ("method", "ratio", "layers_spec", "budget", "seed")} == {
      "method": "random", "ratio": 0.25, "layers_spec": "odd", "budget": "per_layer", "seed": 7}
  assert saved["selected_layers"] == [1, 3] and saved["num_removed"] == 128
  for layer in saved["layers"]:
    assert layer["kept"] == sorted(layer["kept"])
    assert len(layer["kept"]) == layer["width_after"] == 256 - layer["num_removed"]
    if layer["selected"]:
      assert layer["scores"]["all"]["count"] == 256 and layer["scores"]["removed"]["count"] == 64
      assert sorted(layer["removed_order"]) == sorted(set(range(256)) - set(layer["kept"]))
  again = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out2", method="random", ratio=0.25,
                            layers="odd", seed=7)
  other = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out3", method="random", ratio=0.25,
                            layers="odd", seed=8)
  assert [e["kept"] for e in again["layers"]] == [e["kept"] for e in report["layers"]]
  assert [e["kept"] for e in other["layers"]] != [e["kept"] for e in report["layers"]]


def test_registered_task_and_its_cached_shards_give_the_same_pruning(tiny_ckpt, tmp_path):
  """Calibration and held-out perplexity from a registered task (the real data pipeline, its
  train split and, lacking a validation split, its test split), live and from cached shards."""
  from maxnucl.data import pipeline  # pylint: disable=import-outside-toplevel
  common = dict(method="wanda_channel", ratio=0.25, layers="0", calibration="synthetic_arithmetic",
                calibration_examples=8, eval_perplexity="synthetic_arithmetic", eval_examples=4,
                seq_len=32, batch_size=4)
  live = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "live", **common)
  for split in ("train", "test"):
    pipeline.cache_task("synthetic_arithmetic", split, tmp_path / "cache", seq_len=32)
  cached = prune_ffn_neurons(tiny_ckpt[0], tmp_path / "cached", data_cache_dir=tmp_path / "cache",
                             **common)
  first = next(pipeline.create_data_iterator("train", source="synthetic_arithmetic",
                                             batch_size=8, seq_len=32, repeat=False))
  assert live["calibration"]["tokens"] == int(first["loss_mask"].sum()) > 0
  assert cached["calibration"] == dict(live["calibration"])
  assert [e["kept"] for e in cached["layers"]] == [e["kept"] for e in live["layers"]]
  for report in (live, cached):
    before, after = report["perplexity"]["before"], report["perplexity"]["after"]
    assert before["tokens"] > 0 and math.isfinite(before["perplexity"])
    assert after["perplexity"] != before["perplexity"]
  assert cached["perplexity"]["before"] == live["perplexity"]["before"]


def test_unknown_data_source_is_named_and_nothing_is_written(tiny_ckpt, tmp_path):
  with pytest.raises(ValueError, match="'no_such_task' is not a .npy/.jsonl file nor a registered"):
    prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="magnitude", ratio=0.25,
                      eval_perplexity="no_such_task", eval_examples=4)
  assert list(tmp_path.iterdir()) == []


def test_checkpoints_save_inputs_are_copied_in_blocks_not_read_whole(tmp_path, monkeypatch):
  """`checkpoints.save` chunks every array (<= _CHUNK_BYTES), so the pruner copies unchanged
  tensors through lazy TensorStore views instead of reading them whole."""
  from maxnucl.pruning import io  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(checkpoints, "_CHUNK_BYTES", 8192)
  monkeypatch.setattr(io, "MAX_LAZY_CHUNK_BYTES", 8192)
  params = random_params(TINY, 5)
  checkpoints.save(tmp_path / "in", TINY, params)
  whole = []
  read = io.CheckpointReader.read
  monkeypatch.setattr(io.CheckpointReader, "read",
                      lambda self, key: whole.append(key) or read(self, key))
  prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="magnitude", ratio=0.25)
  assert whole and all(key[1] == "mlp" for key in whole), whole  # only the FFNs being pruned
  _, pruned = checkpoints.load(tmp_path / "out")
  np.testing.assert_array_equal(np.asarray(pruned["embedder"]["embedding"]),
                                params["embedder"]["embedding"])
