"""The pruner on a device mesh and across processes: the model restored sharded, the same kept
neurons, statistics and perplexities as on one device (tests run on 8 simulated CPU devices)."""

import json
import pathlib

import jax
import numpy as np
import pytest

import processes
from maxnucl import checkpoints, models, sharding
from maxnucl.pruning import calibration, prune, prune_ffn_neurons
from tolerances import EPS32, decoder_terms, gradient_terms, rounding_atol

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = models.get_config("gemma2_tiny", num_layers=2)
SEQ = 17


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[0]))
                      .astype(np.float32), models.abstract_params(cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A 2-layer tiny Gemma-2 checkpoint and a .jsonl source of 6 variable-length sequences: 6 rows
  fill no multiple of 4 or 8 batch shards, so the sharded passes pad them."""
  root = tmp_path_factory.mktemp("sharded")
  checkpoints.save(root / "ckpt", TINY, _random_params(TINY, 0))
  rng = np.random.default_rng(1)
  source = root / "calib.jsonl"
  source.write_text("".join(json.dumps(rng.integers(3, TINY.vocab_size, n).tolist()) + "\n"
                            for n in (SEQ, 9, 14, SEQ, 6, 12)))
  return root / "ckpt", source


COMMON = dict(method="lp", ratio=0.25, budget="global", calibration_examples=6,
              eval_examples=6, batch_size=3)


def _nll_atol(nll, tokens):
  """A mean next-token NLL over `tokens` tokens computed in other shards or processes (other
  padding, other sums) differs by a logit's roundings, the vocabulary's log-sum-exp and the sum
  over the tokens (tests/tolerances.py)."""
  return rounding_atol(abs(nll), decoder_terms(TINY, SEQ) + TINY.vocab_size + tokens)


def _assert_same_pruning(report, reference):
  assert [e["kept"] for e in report["layers"]] == [e["kept"] for e in reference["layers"]]
  assert report["calibration"] == reference["calibration"]
  for when in ("before", "after"):
    ours, theirs = report["perplexity"][when], reference["perplexity"][when]
    assert ours["tokens"] == theirs["tokens"]
    atol = _nll_atol(theirs["nll"], theirs["tokens"])
    assert ours["nll"] == pytest.approx(theirs["nll"], abs=atol)
    # perplexity = exp(nll): perplexity times the NLL's error, and exp's own rounding
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"],
                                               abs=theirs["perplexity"] * (atol + EPS32))


@pytest.fixture(scope="module")
def single_device_report(tiny, tmp_path_factory):
  path, source = tiny
  return prune_ffn_neurons(path, tmp_path_factory.mktemp("single") / "out", calibration=source,
                           eval_perplexity=source, **COMMON)


@pytest.mark.parametrize("mesh_shape", ["1,-1,1", (2, 2, 2)])
def test_pruning_on_a_mesh_loads_the_model_sharded_and_equals_one_device(
    tiny, single_device_report, tmp_path, monkeypatch, mesh_shape):
  path, source = tiny
  loaded = []
  load = prune.load_whole_model
  monkeypatch.setattr(prune, "load_whole_model",
                      lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
  report = prune_ffn_neurons(path, tmp_path / "out", calibration=source, eval_perplexity=source,
                             mesh_shape=mesh_shape, **COMMON)
  _assert_same_pruning(report, single_device_report)
  assert len(loaded) == 2  # the input (calibration, perplexity before) and the pruned output
  for params in loaded:
    gate = params["layers_0"]["mlp"]["gate"]  # [d, m]: "embed" -> fsdp, "mlp" -> tensor
    assert isinstance(gate, jax.Array) and len(gate.sharding.device_set) == 8
    assert not gate.sharding.is_fully_replicated
    assert gate.addressable_shards[0].data.size < gate.size
  assert loaded[1]["layers_0"]["mlp"]["gate"].shape[1] == report["ffn_widths_after"][0]
  pruned_cfg, pruned = checkpoints.load(tmp_path / "out")
  assert pruned_cfg.ffn_widths == tuple(single_device_report["ffn_widths_after"])
  assert report["mesh_shape"] == dict(sharding.create_mesh(
      sharding.parse_mesh_shape(mesh_shape)).shape)


def test_sharded_statistics_and_perplexity_equal_the_single_device_ones(tiny):
  path, source = tiny
  mesh, rules = sharding.create_mesh((1, -1, 1)), sharding.logical_axis_rules()
  _, params = checkpoints.load(path)
  _, sharded = checkpoints.load(path, mesh=mesh, rules=rules)

  def batches():
    return calibration.iterate_batches(source, num_examples=6, batch_size=3)

  single = calibration.collect_stats(TINY, params, batches())
  on_mesh = calibration.collect_stats(TINY, sharded, batches(), mesh=mesh, rules=rules)
  for name, stats in single.items():
    assert on_mesh[name].count == stats.count
    # sums over the tokens of FFN inputs and activations (at most a logit's path of roundings
    # each) and of activation-gradient products (a gradient's path); a square doubles the
    # relative error.  Sums of squares add positive terms (a relative bound); a_sum's terms are
    # bounded by Cauchy-Schwarz: sum |a| <= sqrt(count sum a^2).
    count = int(stats.count)
    forward, backward = decoder_terms(TINY, SEQ), gradient_terms(TINY, SEQ, count)
    for field, terms in (("x_sq_sum", 2 * forward + count), ("a_sq_sum", 2 * forward + count),
                         ("ag_sq_sum", 2 * backward + count)):
      np.testing.assert_allclose(getattr(on_mesh[name], field), getattr(stats, field),
                                 rtol=EPS32 * terms, err_msg=f"{name} {field}")
    np.testing.assert_allclose(on_mesh[name].a_sum, stats.a_sum, rtol=0, err_msg=f"{name} a_sum",
                               atol=rounding_atol(np.sqrt(count * stats.a_sq_sum).max(),
                                                  forward + count))
    # per-sequence means (`activation`): each off by a logit's path and its sum over at most SEQ
    # tokens, times |a| <= A = max sqrt(sum a^2); squaring multiplies that by at most 2 A; then
    # the sum over the 6 sequences (padded rows add nothing)
    largest = np.sqrt(stats.a_sq_sum).max()
    for field in ("seq_mean_sq_sum", "seq_abs_mean_sq_sum"):
      np.testing.assert_allclose(
          getattr(on_mesh[name], field), getattr(stats, field), rtol=0, err_msg=f"{name} {field}",
          atol=6 * 2 * largest * rounding_atol(largest, forward + SEQ + 6))
  nll = calibration.perplexity(TINY, params, batches())
  assert calibration.perplexity(TINY, sharded, batches(), mesh=mesh, rules=rules)[
      "nll"] == pytest.approx(nll["nll"], abs=_nll_atol(nll["nll"], nll["tokens"]))


@pytest.mark.parametrize("mesh_shape, match", [
    ("1,-1", r"--mesh_shape '1,-1': expected three integers data,fsdp,tensor"),
    ("a,b,c", r"--mesh_shape 'a,b,c': expected three integers"),
    ("3,-1,1", r"--mesh_shape 3,-1,1: mesh shape \[3, -1, 1\]: 8 devices are not divisible"),
    ("4,4,1", r"--mesh_shape 4,4,1: mesh shape \[4, 4, 1\] needs 16 devices, but 8 are"),
])
def test_a_bad_mesh_shape_is_refused_naming_the_flag(tiny, tmp_path, mesh_shape, match):
  with pytest.raises(ValueError, match=match):  # PruningError or the parser's ValueError
    prune_ffn_neurons(tiny[0], tmp_path / "out", method="magnitude", ratio=0.25,
                      mesh_shape=mesh_shape)
  assert list(tmp_path.iterdir()) == []


def _run_two_processes(arguments: list[str]) -> list[tuple[int, str, str]]:
  """`maxnucl-prune ARGUMENTS` as two processes of 2 CPU devices each (4 devices in all);
  (exit status, stdout, stderr) of each."""
  return processes.run([str(REPO / "tools" / "prune_checkpoint.py"), *arguments,
                        "--heartbeat_timeout_s", "60"])


def test_two_processes_prune_like_one(tiny, single_device_report, tmp_path):
  """Two processes (a 4-device mesh spanning both): process 0 writes the checkpoint and the
  report and prints the summary, process 1 prints nothing, both exit 0, and the kept neurons and
  perplexities equal the single-process, single-device run."""
  path, source = tiny
  results = _run_two_processes([
      "--input", str(path), "--output", str(tmp_path / "out"),
      "--report", str(tmp_path / "report.json"), "--method", COMMON["method"],
      "--ratio", str(COMMON["ratio"]), "--budget", COMMON["budget"], "--calibration", str(source),
      "--calibration_examples", "6", "--eval_perplexity", str(source), "--eval_examples", "6",
      "--batch_size", "3", "--mesh_shape", "1,-1,1"])
  for status, _, err in results:
    assert status == 0, err[-3000:]
  printed = [processes.printed_lines(out) for _, out, _ in results]
  assert len(printed[0]) == 1 and json.loads(printed[0][0])["output"] == str(tmp_path / "out")
  assert printed[1] == []
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
  _assert_same_pruning(report, single_device_report)
  assert checkpoints.load_config(tmp_path / "out").ffn_widths == tuple(
      single_device_report["ffn_widths_after"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]


def test_two_process_errors_name_the_process(tiny, tmp_path):
  results = _run_two_processes(["--input", str(tiny[0]), "--output", str(tmp_path / "out"),
                                "--method", "magnitude", "--ratio", "1.5"])
  for index, (status, _, err) in enumerate(results):
    assert status == 2, err[-3000:]
    assert f"error: [process {index}/2] --ratio 1.5: expected" in err
  assert list(tmp_path.iterdir()) == []
