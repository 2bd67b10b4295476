"""Structured FFN neuron pruning (maxnucl.pruning, tools/prune_checkpoint.py) as specifications."""

import hashlib
import json
import math
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from maxnucl import checkpoints, models
from maxnucl.outputs import OutputPathError
from maxnucl.pruning import calibration, prune_ffn_neurons, register, select_layers
from maxnucl.pruning import io as pruning_io
from maxnucl.pruning.prune import PruningError
from maxnucl.pruning.scores import METHODS
import interrupting
from tolerances import EPS32, decoder_terms, gradient_terms, magnitude, rounding_atol

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


def _logit_atol(*logits, merges=0):
  """Two float32 computations of the logits of `_logits` (a pruned model and the full one, whose
  sums run in other widths and orders) differ by the roundings along a logit's path
  (tests/tolerances.py), plus `merges` roundings per layer where the pruner folded removed
  neurons into kept ones (a merged row W_k + lambda W_j rounds once per operation)."""
  return rounding_atol(magnitude(*logits), decoder_terms(TINY, SEQ) + merges * TINY.num_layers)


def _zero_removed(params, report):
  zeroed = jax.tree.map(np.array, params)
  for layer in report["layers"]:
    removed = np.setdiff1d(np.arange(layer["width_before"]), layer["kept"])
    if removed.size:  # a layer of width 0 has no mlp
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
                                    "lp", "scar_prot", "activation"])
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
  expected = _logits(TINY, _zero_removed(params, report))
  np.testing.assert_allclose(_logits(cfg, pruned), expected, rtol=0, atol=_logit_atol(expected))


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


def _np_gelu_tanh(z):
  return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def _ffn_inputs_and_activations(params, sequences):
  """Per FFN layer, x [N, d] (the FFN input: the pre_ffw_norm output) and a [N, m] (the inner
  activation) at the N positions of `sequences` that predict a real next token, from one forward
  pass over the rows padded to one length.  a is checked against act(x U) * (x V) in numpy, which
  certifies that x is the tensor the FFN reads."""
  from maxnucl.models.decoder import Decoder  # pylint: disable=import-outside-toplevel
  length = max(len(s) for s in sequences) - 1
  tokens = np.zeros((len(sequences), length), np.int32)
  for r, s in enumerate(sequences):
    tokens[r, :len(s) - 1] = s[:-1]
  loss_positions = np.arange(length) < np.array([len(s) - 1 for s in sequences])[:, None]
  _, inner = models.apply_with_ffn(TINY, params, tokens)
  _, state = Decoder(TINY).apply({"params": params}, tokens, np.ones_like(tokens),
                                 np.broadcast_to(np.arange(length), tokens.shape),
                                 capture_intermediates=True, mutable=["intermediates"])
  x, a = {}, {}
  for name in models.ffn_layer_names(TINY):
    x[name] = np.asarray(state["intermediates"][name]["pre_ffw_norm"]["__call__"][0],
                         np.float64)[loss_positions]
    a[name] = np.asarray(inner[name], np.float64)[loss_positions]
    mlp = params[name]["mlp"]
    # a = gelu(x U) (x V) in float32: each dot of d terms is off by d eps sum|x||U|, the product
    # by both (gelu's slope is at most 1.13), plus the activation's own few operations
    size = ((np.abs(x[name]) @ np.abs(mlp["gate"])).max()
            * (np.abs(x[name]) @ np.abs(mlp["up"])).max())
    np.testing.assert_allclose(_np_gelu_tanh(x[name] @ mlp["gate"]) * (x[name] @ mlp["up"]),
                               a[name], rtol=0, atol=rounding_atol(size, 2 * (TINY.d_model + 8)))
  return x, a


def _np_wanda_channel(x, a, gate, up, out):
  """s_j = sum_r |U_rj| ||x_r|| + sum_r |V_rj| ||x_r|| + sum_o |W_jo| ||a_j||, norms over tokens."""
  x_norm, a_norm = np.sqrt((x ** 2).sum(0)), np.sqrt((a ** 2).sum(0))
  return (np.abs(gate) * x_norm[:, None]).sum(0) + (np.abs(up) * x_norm[:, None]).sum(0) + \
      np.abs(out).sum(1) * a_norm


def _np_flap(x, a, gate, up, out):
  """s_j = Var_n(a_nj) * ||W_j||^2 (FLAP's fluctuation metric)."""
  del x, gate, up
  return ((a - a.mean(0)) ** 2).mean(0) * (out ** 2).sum(1)


@pytest.mark.parametrize("method", ["wanda_channel", "flap"])
def test_data_aware_choices_match_numpy_reference(tmp_path, method):
  """Scores and removal sets of wanda_channel and flap, per layer and under a global budget
  (FLAP: z-scores per layer, then one ranking), against the method definitions in numpy.  W is
  scaled by 0.5, 1, 2, 4 in layers 0-3, so a global ranking without FLAP's standardisation, or a
  budget that were not really global, would pick other neurons."""
  from maxnucl.pruning.scores import LayerInputs  # pylint: disable=import-outside-toplevel
  params = random_params(TINY, 6)
  for i, scale in enumerate((0.5, 1.0, 2.0, 4.0)):
    params[f"layers_{i}"]["mlp"]["out"] *= scale
  checkpoints.save(tmp_path / "in", TINY, params)
  jsonl = _variable_length_jsonl(tmp_path / "calib.jsonl")
  x, a = _ffn_inputs_and_activations(
      params, [json.loads(line) for line in jsonl.read_text().splitlines()])
  names = models.ffn_layer_names(TINY)
  mlps = {n: {k: np.asarray(v, np.float64) for k, v in params[n]["mlp"].items()} for n in names}
  reference = {n: {"wanda_channel": _np_wanda_channel, "flap": _np_flap}[method](
      x[n], a[n], **mlps[n]) for n in names}

  stats = calibration.collect_stats(TINY, params, calibration.iterate_batches(jsonl,
                                                                              num_examples=8))
  for i, n in enumerate(names):
    mlp = params[n]["mlp"]
    scores = METHODS[method].fn(LayerInputs(i, n, mlp["gate"], mlp["up"], mlp["out"], stats[n],
                                            np.random.default_rng(0), {}))
    # float32 sums over the tokens' activations (and their squares) and over W's row: each
    # score is off by (tokens + 3 d) eps times the largest score (the activations carry their
    # own d-term dots, squared)
    terms = x[n].shape[0] + 3 * TINY.d_model
    np.testing.assert_allclose(scores, reference[n], rtol=0,
                               atol=rounding_atol(np.abs(reference[n]).max(), terms), err_msg=n)

  per_layer = prune_ffn_neurons(tmp_path / "in", tmp_path / "per_layer", method=method,
                                ratio=0.3, calibration=jsonl, calibration_examples=8)
  for layer in per_layer["layers"]:
    assert set(range(256)) - set(layer["kept"]) == _reference_removed(
        reference[layer["name"]], math.floor(0.3 * 256), highest=False), layer["name"]

  def global_choice(standardise):
    ranked = np.concatenate([(s - s.mean()) / s.std() if standardise else s
                             for s in reference.values()])
    chosen = np.argsort(ranked, kind="stable")[:math.floor(0.3 * 4 * 256)]
    return {n: set((chosen[chosen // 256 == i] % 256).tolist()) for i, n in enumerate(names)}

  expected = global_choice(standardise=method == "flap")
  if method == "flap":
    assert expected != global_choice(standardise=False)
  else:
    assert len({len(removed) for removed in expected.values()}) > 1
  overall = prune_ffn_neurons(tmp_path / "in", tmp_path / "global", method=method, ratio=0.3,
                              budget="global", calibration=jsonl, calibration_examples=8)
  for layer in overall["layers"]:
    assert set(range(256)) - set(layer["kept"]) == expected[layer["name"]], layer["name"]


def _np_activation(x, gate, up, lengths, absolute=False):
  """Minitron's F_neuron, (batch = L2, sequence = mean): sqrt(sum_s (mean_{n in s} a_nj)^2), with
  a = gelu(x U) * (x V) recomputed in numpy from the FFN input and the weights; x holds the
  sequences' tokens one after the other (`lengths` of them each)."""
  a = _np_gelu_tanh(x @ gate) * (x @ up)
  a = np.abs(a) if absolute else a
  means = np.stack([rows.mean(0) for rows in np.split(a, np.cumsum(lengths)[:-1])])
  return np.sqrt((means ** 2).sum(0))


def test_activation_scores_match_numpy_reference_whatever_the_batching(tiny_ckpt, tmp_path):
  """The `activation` scores (signed and absolute means) against numpy from the FFN inputs and
  the weights, for 8 variable-length sequences collected as one batch or as batches of 3, 3, 2
  (other padding, other rows per batch), and the per-layer removal set of prune_ffn_neurons."""
  from maxnucl.pruning.scores import LayerInputs  # pylint: disable=import-outside-toplevel
  path, params = tiny_ckpt
  jsonl = _variable_length_jsonl(tmp_path / "calib.jsonl")
  sequences = [json.loads(line) for line in jsonl.read_text().splitlines()]
  lengths = [len(s) - 1 for s in sequences]
  x, _ = _ffn_inputs_and_activations(params, sequences)
  stats = {size: calibration.collect_stats(TINY, params, calibration.iterate_batches(
      jsonl, num_examples=8, batch_size=size)) for size in (8, 3)}
  references = {}
  for i, name in enumerate(models.ffn_layer_names(TINY)):
    mlp = {k: np.asarray(v, np.float64) for k, v in params[name]["mlp"].items()}
    # each float32 activation is off by the roundings of its two d-term dots and the activation
    # (as in _ffn_inputs_and_activations), a sequence mean adds its own sum's; the L2 norm over
    # the sequences of those errors is at most sqrt(sequences) times the largest
    size = max((np.abs(x[name]) @ np.abs(mlp["gate"])).max() * (np.abs(x[name]) @ np.abs(
        mlp["up"])).max(), 1.0)
    atol = np.sqrt(len(lengths)) * rounding_atol(size, 2 * (TINY.d_model + 8) + max(lengths))
    for absolute in (False, True):
      reference = _np_activation(x[name], mlp["gate"], mlp["up"], lengths, absolute)
      if not absolute:
        references[name] = reference
      for size_, layer_stats in stats.items():
        scores = METHODS["activation"].fn(LayerInputs(
            i, name, params[name]["mlp"]["gate"], params[name]["mlp"]["up"],
            params[name]["mlp"]["out"], layer_stats[name], np.random.default_rng(0),
            {"absolute": absolute}))
        np.testing.assert_allclose(scores, reference, rtol=0, atol=atol,
                                   err_msg=f"{name} absolute={absolute} batch_size={size_}")
  report = prune_ffn_neurons(path, tmp_path / "out", method="activation", ratio=0.3,
                             calibration=jsonl, calibration_examples=8, batch_size=3)
  for layer in report["layers"]:
    assert set(range(256)) - set(layer["kept"]) == _reference_removed(
        references[layer["name"]], math.floor(0.3 * 256), highest=False), layer["name"]


def test_activation_statistic_on_constructed_sequences():
  """sum_s (mean_{n in s} a_nj)^2 on a hand-made batch: two rows, the first packing two
  sequences and a padding token, the second one sequence with two masked tokens.  Neuron 0 is
  silent (0), neuron 1's signed activations cancel within every sequence (0 signed; its absolute
  means are 2/3, 2 and 2), neuron 2 is 2 on every unmasked token (3 sequences of mean 2: 12; the
  masked 100 and the rows' shared segment id 1 must not count)."""
  a = np.zeros((2, 6, 3), np.float32)
  a[0, :, 1] = [1, -1, 0, 2, -2, 7]
  a[1, :, 1] = [3, -3, 1, -1, 50, 50]
  a[..., 2] = 2.0
  a[0, 5, 2] = a[1, 4:, 2] = 100.0
  segment_ids = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], np.float32)
  signed, absolute = calibration.sequence_mean_squares(a, mask, segment_ids)
  # a few float32 roundings of values up to 100 (masked to 0), means of at most 4 terms
  atol = rounding_atol(100.0, 8)
  np.testing.assert_allclose(signed, [0.0, 0.0, 12.0], rtol=0, atol=atol)
  np.testing.assert_allclose(absolute, [0.0, (2 / 3) ** 2 + 4 + 4, 12.0], rtol=0, atol=atol)


def test_activation_removes_silent_neurons_first(tmp_path):
  """tools/prune_checkpoint.py --method activation with calibration data: neurons whose up
  column V_j is 0 have a_j = 0 on every token, so they score exactly 0 and are removed first (in
  index order); every layer is cut to 75 % of its width."""
  cfg = TINY.replace(num_layers=2)
  params = random_params(cfg, 1)
  params["layers_0"]["mlp"]["up"][:, [5, 77]] = 0.0
  checkpoints.save(tmp_path / "in", cfg, params)
  jsonl = _variable_length_jsonl(tmp_path / "calib.jsonl")
  run = subprocess.run(
      [sys.executable, str(REPO / "tools" / "prune_checkpoint.py"), "--input",
       str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--method", "activation",
       "--ratio", "0.25", "--calibration", str(jsonl), "--calibration_examples", "8",
       "--report", str(tmp_path / "report.json")],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert run.returncode == 0, run.stderr
  assert checkpoints.load_config(tmp_path / "out").ffn_widths == (192, 192)
  layer = json.loads((tmp_path / "report.json").read_text())["layers"][0]
  assert layer["removed_order"][:2] == [5, 77]
  assert layer["scores"]["removed"]["min"] == 0.0 < layer["scores"]["kept"]["min"]


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
  expected = _logits(TINY, params)  # merged: W_k + 2 W_j, one rounding
  np.testing.assert_allclose(_logits(cfg, pruned), expected, rtol=0,
                             atol=_logit_atol(expected, merges=1))


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
  # the constructed up column 0.7 V - 1.3 V rounds 3 times, each merge W_k + lambda_k W_j twice
  expected = _logits(TINY, params)
  np.testing.assert_allclose(_logits(cfg, pruned), expected, rtol=0,
                             atol=_logit_atol(expected, merges=5))


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

  def loss(scale):  # the summed token NLL (every position is a loss token here)
    logits, _ = models.apply_with_ffn(TINY, params, batch["tokens"], ffn_inner_scale=scale)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, batch["targets"][..., None], -1))

  ones = {n: jnp.ones(batch["tokens"].shape + (256,)) for n in names}
  grads = jax.grad(loss)(ones)
  # two computations of each token's gradient (its path's roundings), squared (twice the
  # relative error), then the mean over the tokens
  tokens = batch["tokens"].size
  rtol = EPS32 * (2 * gradient_terms(TINY, batch["tokens"].shape[1], tokens) + tokens)
  for n in names:
    expected = 0.5 * np.mean(np.asarray(grads[n]) ** 2, axis=(0, 1))
    np.testing.assert_allclose(stats[n].loss_proxy, expected, rtol=rtol)


def _variable_length_jsonl(path):
  """8 calibration sequences of 6 to 17 tokens, one JSON list per line."""
  rng = np.random.default_rng(12)
  lengths = [17, 9, 14, 6, 17, 11, 8, 15]
  path.write_text("".join(json.dumps(rng.integers(3, TINY.vocab_size, n).tolist()) + "\n"
                          for n in lengths))
  return path


def test_lp_and_scar_scores_do_not_depend_on_how_calibration_rows_are_batched(tiny_ckpt,
                                                                               tmp_path):
  """The same 8 rows as one batch or as batches of 3, 3 and 2 rows (so with other token counts
  and other padding per batch): the same loss proxy, lp / scar_prot scores and removal sets."""
  from maxnucl.pruning import surgery  # pylint: disable=import-outside-toplevel
  from maxnucl.pruning.scores import LayerInputs  # pylint: disable=import-outside-toplevel
  path, params = tiny_ckpt
  jsonl = _variable_length_jsonl(tmp_path / "calib.jsonl")
  stats = {size: calibration.collect_stats(TINY, params, calibration.iterate_batches(
      jsonl, num_examples=8, batch_size=size)) for size in (8, 3)}
  # LP = mean over tokens of squared gradients: each gradient is off by its path's roundings in
  # other batches (other padding, other sums), squared doubles it, then the sum over the tokens
  tokens = sum([16, 8, 13, 5, 16, 10, 7, 14])
  rtol = EPS32 * (2 * gradient_terms(TINY, 17, tokens) + tokens)
  for name, one_batch in stats[8].items():
    assert stats[3][name].count == one_batch.count == tokens
    np.testing.assert_allclose(stats[3][name].loss_proxy, one_batch.loss_proxy, rtol=rtol)
    mlp = params[name]["mlp"]
    for method in ("lp", "scar_prot"):
      scores = {size: METHODS[method].fn(LayerInputs(
          int(name.split("_")[1]), name, mlp["gate"], mlp["up"], mlp["out"], stats[size][name],
          np.random.default_rng(0), dict(METHODS[method].defaults))) for size in (8, 3)}
      np.testing.assert_allclose(scores[3], scores[8], rtol=rtol, err_msg=f"{method} {name}")
      removed = [set(surgery.top_removals(METHODS[method].priority(scores[size]), 77).tolist())
                 for size in (8, 3)]
      assert removed[0] == removed[1], (method, name)
  reports = [prune_ffn_neurons(path, tmp_path / f"out_{size}", method="lp", ratio=0.3,
                               budget="global", calibration=jsonl, calibration_examples=8,
                               batch_size=size) for size in (8, 3)]
  assert [e["kept"] for e in reports[0]["layers"]] == [e["kept"] for e in reports[1]["layers"]]


def test_npy_jsonl_and_generator_sources_give_the_same_statistics(tiny_ckpt, calib_npy,
                                                                 tmp_path):
  _, params = tiny_ckpt
  jsonl = tmp_path / "calib.jsonl"
  jsonl.write_text("".join(json.dumps({"tokens": row.tolist()}) + "\n"
                           for row in np.load(calib_npy)))
  results = [calibration.collect_stats(TINY, params, calibration.iterate_batches(
      source, num_examples=16, batch_size=4)) for source in (calib_npy, jsonl, synthetic_batches)]
  # the same rows: at most each token's gradient in another order (its path's roundings),
  # squared, then the sum over the tokens
  tokens = 16 * (SEQ - 1)
  rtol = EPS32 * (2 * gradient_terms(TINY, SEQ - 1, tokens) + tokens)
  for other in results[1:]:
    for n, st in results[0].items():
      assert st.count == other[n].count == tokens
      np.testing.assert_allclose(st.loss_proxy, other[n].loss_proxy, rtol=rtol)


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
    ({"method": "activation", "method_params": {"absolute": "maybe"}}, PruningError,
     r"method 'activation': parameter absolute='maybe', expected true or false"),
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


def test_output_aliasing_inside_or_around_the_input_is_refused_and_the_input_kept(tiny_ckpt,
                                                                                  tmp_path):
  inputs = tmp_path.resolve() / "inputs"
  ckpt = inputs / "ckpt"
  checkpoints.save(ckpt, TINY, tiny_ckpt[1])
  (tmp_path / "link").symlink_to(ckpt)  # the output is a symlink to the input
  (tmp_path / "alias").symlink_to(inputs)  # the input is given through a symlinked parent
  link, via_alias = tmp_path.resolve() / "link", tmp_path.resolve() / "alias" / "ckpt"
  before = _checksums(ckpt)
  refused = [
      (dict(input_path=ckpt, output_path=link, overwrite=True),
       f"--output {link} (resolves to {ckpt}) is the input checkpoint {ckpt}"),
      (dict(input_path=via_alias, output_path=ckpt / "pruned"),
       f"--output {ckpt / 'pruned'} lies inside the input checkpoint {via_alias}"),
      (dict(input_path=via_alias, output_path=inputs, overwrite=True),
       f"--output {inputs} contains the input checkpoint {via_alias} (resolves to {ckpt})"),
      (dict(input_path=ckpt, output_path=tmp_path / "out", report_path=link / "report.json"),
       f"--report {link / 'report.json'} (resolves to {ckpt / 'report.json'}) lies inside the "
       f"input checkpoint {ckpt}")]
  for kwargs, message in refused:
    with pytest.raises(OutputPathError) as error:
      prune_ffn_neurons(method="entropy", ratio=0.25, **kwargs)
    assert message in str(error.value)
  cli = subprocess.run([sys.executable, str(REPO / "tools" / "prune_checkpoint.py"), "--input",
                        str(ckpt), "--output", str(link), "--overwrite", "--method", "entropy",
                        "--ratio", "0.25"], capture_output=True, text=True, cwd=REPO, check=False)
  assert cli.returncode == 2 and f"is the input checkpoint {ckpt}" in cli.stderr, cli.stderr
  assert _checksums(ckpt) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "inputs", "link"]


def test_report_path_that_cannot_be_written_fails_before_any_work(tiny_ckpt, tmp_path,
                                                                  monkeypatch):
  report = tmp_path / "missing" / "report.json"
  tool = [sys.executable, str(REPO / "tools" / "prune_checkpoint.py"), "--input",
          str(tiny_ckpt[0]), "--output", str(tmp_path / "out"), "--method", "entropy",
          "--ratio", "0.25", "--report", str(report)]
  cli = subprocess.run(tool, capture_output=True, text=True, cwd=REPO, check=False)
  assert cli.returncode == 2, cli.stderr
  assert f"--report {report}: directory {report.parent} does not exist" in cli.stderr
  assert list(tmp_path.iterdir()) == []  # no output checkpoint was written first

  def read(*args, **kwargs):
    raise AssertionError("the input was read before the output paths were checked")

  monkeypatch.setattr(pruning_io, "CheckpointReader", read)
  for report_path, message in ((report, "does not exist"), (tmp_path, "is a directory")):
    with pytest.raises(OutputPathError, match=message) as error:
      prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="entropy", ratio=0.25,
                        report_path=report_path)
    assert f"--report {report_path}" in str(error.value)
  assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
  return interrupting.write_medium_checkpoint(tmp_path_factory.mktemp("medium") / "ckpt")


def _prune_medium(medium_ckpt, output):
  return interrupting.start_and_wait_until_writing(
      "prune_checkpoint.py", ["--input", medium_ckpt, "--output", output, "--method",
                              "magnitude", "--ratio", "0.5"], output)


def test_killed_pruning_leaves_a_temporary_that_the_next_run_removes(medium_ckpt, tmp_path):
  output = tmp_path / "pruned"
  run = _prune_medium(medium_ckpt, output)
  run.kill()  # SIGKILL: no cleanup is possible
  assert run.wait(timeout=60) == -signal.SIGKILL
  assert len(interrupting.temporaries(output)) == 1 and not output.exists()
  prune_ffn_neurons(medium_ckpt, output, method="magnitude", ratio=0.5)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
  assert checkpoints.load_config(output).ffn_widths == (1024,) * 4


def test_sigterm_during_pruning_removes_the_temporary_and_exits_nonzero(medium_ckpt, tmp_path):
  output = tmp_path / "pruned"
  run = _prune_medium(medium_ckpt, output)
  run.terminate()  # SIGTERM
  assert run.wait(timeout=60) == 128 + signal.SIGTERM
  assert list(tmp_path.iterdir()) == []


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
  # one correctly rounded division of the same two counts: exact
  assert result["overlap"]["per_layer"]["entropy|random"]["layers_0"] == (
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


def test_report_counts_the_examples_actually_used_not_the_requested_cap(tmp_path):
  cfg = TINY.replace(num_layers=2)
  checkpoints.save(tmp_path / "in", cfg, random_params(cfg, 3))
  rng = np.random.default_rng(0)
  source = tmp_path / "held_out.jsonl"
  source.write_text("".join(json.dumps(rng.integers(3, 300, n).tolist()) + "\n"
                            for n in (12, 30, 7, 20, 9)))  # 5 sequences
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method="wanda_channel",
                             ratio=0.25, calibration=source, calibration_examples=1000,
                             eval_perplexity=source, eval_examples=1000, batch_size=2)
  assert report["perplexity"]["examples"] == 5
  assert report["perplexity"]["examples_requested"] == 1000
  assert report["calibration"]["examples"] == 5
  assert report["perplexity"]["before"]["tokens"] == sum(n - 1 for n in (12, 30, 7, 20, 9))


# ---- every family -------------------------------------------------------------------------------

OTHER_FAMILIES = {
    # untied lm_head and Qwen2's q/k/v biases (non-FFN arrays the pruner copies unchanged), and a
    # layer already at width 0 (no FFN, no pre_ffw_norm)
    "llama_untied_biases": models.get_config("llama_tiny", qkv_bias=True,
                                             ffn_widths=(256, 0, 256, 256)),
    # QK-norms, four FFN-branch norms, one 5:1 local/global period
    "gemma3": models.get_config("gemma3_tiny", ffn_widths=(256, 0, 256, 256, 256, 256)),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
@pytest.mark.parametrize("method", ["entropy", "flap"])
def test_other_families_prune_to_the_zeroed_model(family, method, tmp_path):
  """A Llama-family or Gemma-3 checkpoint, one layer of it without FFN, prunes as Gemma-2's
  does: the pruned model equals the full one with the removed rows of W zeroed."""
  cfg = OTHER_FAMILIES[family]
  params = random_params(cfg, 1)
  checkpoints.save(tmp_path / "in", cfg, params)
  calibration = synthetic_batches if METHODS[method].needs_calibration else None
  report = prune_ffn_neurons(tmp_path / "in", tmp_path / "out", method=method, ratio=0.25,
                             calibration=calibration)
  pruned_cfg, pruned = checkpoints.load(tmp_path / "out")
  assert pruned_cfg.ffn_widths == tuple(w - w // 4 for w in cfg.layer_ffn_widths)
  assert not {"mlp", "pre_ffw_norm", "post_ffw_norm"} & set(pruned["layers_1"])
  expected = _logits(cfg, _zero_removed(params, report))
  atol = rounding_atol(magnitude(expected), decoder_terms(cfg, SEQ))
  np.testing.assert_allclose(_logits(pruned_cfg, pruned), expected, rtol=0, atol=atol)


# ---- untrusted calibration files: refused in one line naming the file and the position -----------

def _write_npy_with_shape(path, data, header_shape):
  """An .npy file whose header declares `header_shape` over all of `data`'s bytes."""
  header = {"descr": np.lib.format.dtype_to_descr(data.dtype), "fortran_order": False,
            "shape": tuple(header_shape)}
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    f.write(np.ascontiguousarray(data).tobytes())


def _rows_with(value, row, column, dtype=np.int64):
  rows = _tokens(7).astype(dtype)
  rows[row, column] = value
  return rows


def _write(path, content):
  if callable(content):
    content(path)
  else:
    path.write_bytes(content)


V = TINY.vocab_size
BAD_CALIBRATION = {
    "id_at_vocab.npy": (lambda p: np.save(p, _rows_with(V, 1, 3)),
                        ["row 1, column 3", f"token id {V}", f"[0, {V})"]),
    "negative.npy": (lambda p: np.save(p, _rows_with(-1, 2, 0)), ["row 2, column 0", "-1"]),
    "wraps_to_5.npy": (lambda p: np.save(p, _rows_with(2 ** 32 + 5, 0, 4)),
                       ["row 0, column 4", str(2 ** 32 + 5)]),
    "stream.npy": (lambda p: np.save(p, np.r_[_tokens(1).ravel(), V + 7]),
                   [f"position {4 * SEQ}", str(V + 7)]),
    "floats.npy": (lambda p: np.save(p, _tokens(1).astype(np.float32)), ["float32"]),
    "short_header.npy": (lambda p: _write_npy_with_shape(p, _tokens(1), (3, SEQ)),
                         ["data size", f"(3, {SEQ})"]),
    "long_header.npy": (lambda p: _write_npy_with_shape(p, _tokens(1), (5, SEQ)),
                        ["data size", f"(5, {SEQ})"]),
    "empty.npy": (b"", ["empty"]),
    "dir.npy": (lambda p: p.mkdir(), ["directory"]),
    "archive.npy": (lambda p: np.savez(open(p, "wb"), a=_tokens(1)), ["not an .npy"]),
    "pickled.npy": (lambda p: np.save(p, np.array([[1, 2]], object), allow_pickle=True),
                    ["object"]),
    "id_at_vocab.jsonl": (f"[5, 6, 7]\n[1, 2, 3, {V}]\n".encode(),
                          ["line 2", "position 3", f"token id {V}"]),
    "negative.jsonl": (b'{"tokens": [5, -2, 7]}\n', ["line 1", "position 1", "-2"]),
    "float.jsonl": (b"[5, 6, 7]\n\n[5, 6.5, 7]\n", ["line 3", "position 1", "6.5"]),
    "integral_float.jsonl": (b"[5, 6.0, 7]\n", ["line 1", "position 1", "6.0"]),
    "string.jsonl": (b'[5, "6", 7]\n', ["line 1", "position 1", "'6'"]),
    "boolean.jsonl": (b"[true, 6, 7]\n", ["line 1", "position 0", "True"]),
    "nan.jsonl": (b"[5, NaN, 7]\n", ["line 1", "position 1", "nan"]),
    "huge.jsonl": (f"[5, {2 ** 64 + 5}]\n".encode(), ["line 1", "position 1", str(2 ** 64 + 5)]),
    "not_utf8.jsonl": (b"[5, 6, 7]\n[5, 6\xff, 7]\n", ["line 2", "UTF-8"]),
    "no_rows.jsonl": (b"\n\n", ["no sequences"]),
    "one_token.jsonl": (b"[5]\n", ["line 1", "at least 2"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CALIBRATION))
def test_bad_calibration_file_is_refused_in_one_line_before_the_model_is_loaded(
    tiny_ckpt, tmp_path, monkeypatch, capsys, name):
  """Out-of-range and non-integer ids, a header that does not cover the data, an empty file,
  a directory, an archive: exit 2, one line naming the file, the position and what was
  expected; the model is never loaded and nothing is written."""
  from maxnucl.pruning import cli, prune  # pylint: disable=import-outside-toplevel
  writer, fragments = BAD_CALIBRATION[name]
  source = tmp_path / name
  _write(source, writer)
  monkeypatch.setattr(prune, "load_whole_model",
                      lambda *a, **k: pytest.fail("the model was loaded before the check"))
  code = cli.prune_main(["--input", str(tiny_ckpt[0]), "--output", str(tmp_path / "out"),
                         "--method", "wanda_channel", "--ratio", "0.25",
                         "--calibration", str(source)])
  err = [line for line in capsys.readouterr().err.splitlines()
         if not line.startswith("vocabulary:")]
  assert code == 2 and len(err) == 1, err
  assert "error:" in err[0] and name in err[0], err
  for fragment in fragments:
    assert fragment in err[0], (fragment, err[0])
  assert not (tmp_path / "out").exists()


def test_out_of_range_held_out_ids_are_refused_not_a_nan_perplexity(tiny_ckpt, tmp_path):
  """--eval_perplexity reads the same files: an id >= the vocabulary used to give NaN."""
  source = tmp_path / "heldout.npy"
  np.save(source, _rows_with(V + 1, 3, 16))
  with pytest.raises(calibration.CalibrationError, match=r"heldout.npy: row 3, column 16"):
    prune_ffn_neurons(tiny_ckpt[0], tmp_path / "out", method="magnitude", ratio=0.25,
                      eval_perplexity=source, eval_examples=8)
  assert list(tmp_path.iterdir()) == [source]


def test_batches_of_any_source_are_range_checked_against_the_model(tiny_ckpt):
  """A generator (or a registered task) is checked as its batches arrive: the statistics and
  the perplexity refuse an id outside [0, vocab) instead of reading past the embedding."""
  _, params = tiny_ckpt

  def batches():
    yield {"tokens": _tokens(0)}
    yield {"tokens": _rows_with(V, 2, 5)}
  for fn in (calibration.collect_stats, calibration.perplexity):
    with pytest.raises(calibration.CalibrationError, match=r"batch 1, row 2, column 5.*"
                       rf"token id {V}.*\[0, {V}\)"):
      fn(TINY, params, calibration.iterate_batches(batches, num_examples=8))


def test_valid_calibration_files_are_read_exactly(tmp_path):
  """The largest id (vocab - 1), unsigned and narrow integer dtypes, a 1-D stream and jsonl
  rows of both forms are accepted and read unchanged."""
  rows = _rows_with(V - 1, 0, 0)
  for dtype in (np.int64, np.uint16, np.int32):
    np.save(tmp_path / "rows.npy", rows.astype(dtype))
    (batch,) = calibration.iterate_batches(tmp_path / "rows.npy", num_examples=4, batch_size=4,
                                           vocab_size=V)
    np.testing.assert_array_equal(batch["tokens"], rows[:, :-1])
    np.testing.assert_array_equal(batch["targets"], rows[:, 1:])
  jsonl = tmp_path / "rows.jsonl"
  jsonl.write_text(json.dumps(rows[0].tolist()) + "\n" + json.dumps({"tokens": [1, V - 1]}) + "\n")
  (batch,) = calibration.iterate_batches(jsonl, num_examples=2, batch_size=2, vocab_size=V)
  np.testing.assert_array_equal(batch["tokens"][0], rows[0, :-1])
  np.testing.assert_array_equal(batch["targets"][1, :1], [V - 1])
  np.testing.assert_array_equal(batch["loss_mask"][1], [1] + [0] * (SEQ - 2))
