"""Model behaviour: packing, per-layer widths, param counts, config errors, dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import models
from maxnucl.layers.embeddings import Embedder
from tolerances import decoder_terms, gradient_terms, magnitude, rounding_atol

FAMILIES = ["gemma2_tiny", "gemma3_tiny", "llama_tiny", "palm_tiny"]


def _setup(name, **overrides):
  cfg = models.get_config(name, **overrides)
  return cfg, models.init(cfg, jax.random.PRNGKey(1))


def _logit_atol(cfg, reference, length):
  """Two programs of the same function (other fusions, sums in other orders): the roundings of a
  logit's path, relative to the largest logit."""
  return rounding_atol(magnitude(reference), decoder_terms(cfg, length))


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_row_equals_each_example_alone(name):
  cfg, params = _setup(name)
  rng = np.random.RandomState(0)
  a, b = rng.randint(3, cfg.vocab_size, 23), rng.randint(3, cfg.vocab_size, 17)  # a > window
  packed = np.zeros((1, 48), np.int32)
  packed[0, :23], packed[0, 23:40] = a, b
  segments = np.zeros((1, 48), np.int32)
  segments[0, :23], segments[0, 23:40] = 1, 2  # padding after position 40 is segment 0
  logits = np.asarray(models.apply(cfg, params, packed, segment_ids=segments))
  alone_a = np.asarray(models.apply(cfg, params, a[None]))
  alone_b = np.asarray(models.apply(cfg, params, b[None]))
  atol = rounding_atol(magnitude(alone_a, alone_b), decoder_terms(cfg, 48))
  np.testing.assert_allclose(logits[0, :23], alone_a[0], atol=atol)
  np.testing.assert_allclose(logits[0, 23:40], alone_b[0], atol=atol)
  assert np.all(np.isfinite(logits))


def test_positions_restart_per_segment():
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
  np.testing.assert_array_equal(models.positions_from_segments(segments), expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_explicit_positions_are_used(name):
  cfg, params = _setup(name)
  tokens = np.arange(3, 13)[None]
  shifted = np.asarray(models.apply(cfg, params, tokens, positions=np.arange(5, 15)[None]))
  default = np.asarray(models.apply(cfg, params, tokens))
  # RoPE is relative: a constant position offset leaves every logit unchanged up to rounding: a
  # logit's path, and per layer the q and k rotations, whose angles (position x frequency, up to
  # 15 rad) round relative to the angle: 15 roundings of a unit sine each ...
  atol = rounding_atol(magnitude(default), decoder_terms(cfg, 10) + cfg.num_layers * 2 * 15)
  np.testing.assert_allclose(shifted, default, rtol=0, atol=atol)
  # ... while non-uniform positions change them by more than rounding explains.
  scrambled = np.asarray(models.apply(cfg, params, tokens,
                                      positions=np.array([[0, 1, 2, 3, 4, 9, 10, 11, 12, 13]])))
  assert np.abs(scrambled - default)[0, 5:].max() > atol


@pytest.mark.parametrize("name", FAMILIES)
def test_per_layer_widths_shape_params_and_zero_width_layer_has_no_ffn(name):
  widths = (256, 0, 128, 32)
  cfg, params = _setup(name, num_layers=4, ffn_widths=widths)
  for i, width in enumerate(widths):
    layer = params[f"layers_{i}"]
    if width == 0:
      assert "mlp" not in layer and "pre_ffw_norm" not in layer
    else:
      assert layer["mlp"]["gate"].shape == (cfg.d_model, width)
      assert layer["mlp"]["up"].shape == (cfg.d_model, width)
      assert layer["mlp"]["out"].shape == (width, cfg.d_model)
  assert models.ffn_layer_names(cfg) == ["layers_0", "layers_2", "layers_3"]
  assert models.param_count(cfg)["ffn"] == 3 * cfg.d_model * sum(widths)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_width_layer_equals_layer_whose_ffn_outputs_zero(name):
  cfg, params = _setup(name)
  tokens = np.random.RandomState(2).randint(3, cfg.vocab_size, (2, 12))
  silenced = jax.tree.map(lambda x: x, params)
  silenced["layers_1"]["mlp"]["out"] = jnp.zeros_like(params["layers_1"]["mlp"]["out"])
  widths = list(cfg.layer_ffn_widths)
  widths[1] = 0
  removed = jax.tree.map(lambda x: x, params)
  for key in ("mlp", "pre_ffw_norm", "post_ffw_norm"):
    removed["layers_1"].pop(key, None)
  reference = models.apply(cfg, silenced, tokens)
  np.testing.assert_allclose(models.apply(cfg.replace(ffn_widths=tuple(widths)), removed, tokens),
                             reference, rtol=0, atol=_logit_atol(cfg, reference, 12))


@pytest.mark.parametrize("name", FAMILIES)
def test_narrower_layer_equals_zeroed_outgoing_rows(name):
  """Slicing neurons out of U, V, W equals zeroing their outgoing rows W_j: pruning's premise."""
  cfg, params = _setup(name)
  keep = np.sort(np.random.RandomState(3).choice(cfg.ffn_dim, 100, replace=False))
  drop = np.setdiff1d(np.arange(cfg.ffn_dim), keep)
  mlp = params["layers_2"]["mlp"]
  sliced = jax.tree.map(lambda x: x, params)
  sliced["layers_2"]["mlp"] = {"gate": mlp["gate"][:, keep], "up": mlp["up"][:, keep],
                               "out": mlp["out"][keep]}
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["layers_2"]["mlp"] = dict(mlp, out=mlp["out"].at[drop].set(0.0))
  widths = list(cfg.layer_ffn_widths)
  widths[2] = len(keep)
  tokens = np.random.RandomState(4).randint(3, cfg.vocab_size, (2, 12))
  reference = models.apply(cfg, zeroed, tokens)  # its FFN sums 256 terms, the sliced one 100
  np.testing.assert_allclose(models.apply(cfg.replace(ffn_widths=tuple(widths)), sliced, tokens),
                             reference, rtol=0, atol=_logit_atol(cfg, reference, 12))


# Paper Table 6 and the published totals.  FFN = U, V, W; outgoing = W.
GEMMA2_PUBLISHED = {
    "gemma2_2b": dict(ffn=1.656e9, ffn_out=552e6, total=2_614_341_888),
    "gemma2_9b": dict(ffn=6.474e9, ffn_out=2.158e9, total=9_241_705_984),
    "gemma2_27b": dict(ffn=23.441e9, ffn_out=7.814e9, total=27_227_128_320),
}


@pytest.mark.parametrize("name", sorted(GEMMA2_PUBLISHED))
def test_gemma2_param_counts_equal_published(name):
  counts = models.param_count(models.get_config(name))
  published = GEMMA2_PUBLISHED[name]
  # "To the shown precision": within one unit of the last digit Table 6 shows (the paper rounds
  # 6.4739B to 6.474B but truncates 23.44197B to 23.441B, so a strict rounding test would fail).
  assert abs(counts["ffn"] - published["ffn"]) < 1e6
  assert abs(counts["ffn_out"] - published["ffn_out"]) < 1e6  # 552M, 2.158B, 7.814B
  assert counts["total"] == published["total"]
  assert counts["ffn"] == counts["ffn_in"] + counts["ffn_out"]
  assert counts["total"] == sum(counts[k] for k in ("embedding", "attention", "ffn", "norm"))


@pytest.mark.parametrize("name,billions", [("palm_8b", 8.63), ("palm_62b", 62.50),
                                           ("palm_540b", 540.35)])
def test_palm_param_counts_near_published(name, billions):
  # PaLM paper Table 1 (8.63B, 62.50B, 540.35B), to within one unit of the last shown digit;
  # the norm layout is not published, which moves the count by well under that unit.
  total = models.param_count(models.get_config(name))["total"]
  assert abs(total / 1e9 - billions) < 0.01


@pytest.mark.parametrize("name", FAMILIES)
def test_param_count_equals_initialised_sizes(name):
  cfg, params = _setup(name, num_layers=4, ffn_widths=(64, 0, 32, 16))
  assert models.param_count(cfg)["total"] == sum(x.size for x in jax.tree.leaves(params))


def test_logical_axes_declared_for_every_param():
  cfg = models.get_config("gemma2_tiny")
  axes = models.logical_axes(cfg)
  shapes = models.abstract_params(cfg)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_axes) == len(flat_shapes)
  for names, leaf in zip(flat_axes, flat_shapes):
    assert len(names) == len(leaf.shape) and all(isinstance(n, str) for n in names)
  assert axes["layers_0"]["mlp"]["out"] == ("mlp", "embed")
  assert axes["embedder"]["embedding"] == ("vocab", "embed")


@pytest.mark.parametrize("field,value,message", [
    ("ffn_widths", (256, 256), "num_layers=4"),
    ("ffn_widths", (256, -1, 256, 256), "layer 1"),
    ("num_kv_heads", 3, "divisor of num_heads"),
    ("family", "gpt2", "family"),
    ("dtype", "float8", "dtype"),
])
def test_invalid_config_names_the_field(field, value, message):
  with pytest.raises(models.ConfigError, match=message) as info:
    models.get_config("gemma2_tiny", **{field: value})
  assert repr(field) in str(info.value)


def test_unknown_preset_and_unknown_override_are_named():
  with pytest.raises(models.ConfigError, match="gemma2_3b"):
    models.get_config("gemma2_3b")
  with pytest.raises(models.ConfigError, match="hidden_size"):
    models.get_config("gemma2_tiny", hidden_size=8)


def test_config_json_round_trip_keeps_per_layer_widths():
  cfg = models.get_config("gemma2_tiny", ffn_widths=(1, 0, 3, 4))
  assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_changing_depth_of_uniform_preset_keeps_it_uniform():
  cfg = models.get_config("gemma2_2b", num_layers=2, ffn_dim=16)
  assert cfg.layer_ffn_widths == (16, 16)


@pytest.mark.parametrize("d,expected", [(2304, 48.0), (3584, 59.75), (4608, 68.0)])
def test_embedding_scale_rounded_to_bf16(d, expected):
  embedder = Embedder(vocab_size=3, d_model=d, input_scale="sqrt_d", dtype=jnp.bfloat16)
  table = jnp.ones((3, d), jnp.float32)
  out = embedder.apply({"params": {"embedding": table}}, jnp.array([[1]]), method="encode")
  assert out.dtype == jnp.bfloat16 and float(out[0, 0, 0]) == expected


def test_param_and_compute_dtypes():
  cfg, params = _setup("gemma2_tiny", param_dtype="bfloat16", dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  logits = models.apply(cfg, params, np.arange(3, 9)[None])
  assert logits.dtype == jnp.float32 and logits.shape == (1, 6, cfg.vocab_size)


def test_dropout_only_with_rng_and_rate():
  cfg, params = _setup("gemma2_tiny", dropout_rate=0.1)
  tokens = np.arange(3, 15)[None]
  plain = models.apply(cfg, params, tokens)
  np.testing.assert_array_equal(plain, models.apply(cfg.replace(dropout_rate=0.0), params, tokens))
  dropped = models.apply(cfg, params, tokens, dropout_rng=jax.random.PRNGKey(0))
  again = models.apply(cfg, params, tokens, dropout_rng=jax.random.PRNGKey(0))
  # more than a logit's rounding could explain
  assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > _logit_atol(cfg, plain, 12)
  np.testing.assert_array_equal(dropped, again)


def test_remat_gives_same_gradients():
  cfg, params = _setup("gemma2_tiny")
  tokens = np.arange(3, 15)[None]

  def loss(p, c):
    return jnp.mean(models.apply(c, p, tokens) ** 2)
  plain = jax.grad(loss)(params, cfg)
  remat = jax.grad(loss)(params, cfg.replace(remat_policy="full"))
  # the recomputed forward may be fused differently: the roundings of a gradient's path
  atol = rounding_atol(magnitude(*jax.tree.leaves(plain)), gradient_terms(cfg, 12, 12))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_apply_with_ffn_returns_inner_activations_and_their_gradient_proxy():
  cfg, params = _setup("gemma2_tiny")
  tokens = np.arange(3, 15)[None]
  logits, inner = models.apply_with_ffn(cfg, params, tokens)
  reference = models.apply(cfg, params, tokens)
  np.testing.assert_allclose(logits, reference, rtol=0, atol=_logit_atol(cfg, reference, 12))
  assert set(inner) == {f"layers_{i}" for i in range(cfg.num_layers)}
  assert inner["layers_0"].shape == (1, 12, cfg.ffn_dim)
  # Scaling one neuron's activation by 0 equals zeroing its outgoing row.
  scale = {"layers_1": jnp.ones(cfg.ffn_dim).at[7].set(0.0)}
  scaled, _ = models.apply_with_ffn(cfg, params, tokens, ffn_inner_scale=scale)
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["layers_1"]["mlp"]["out"] = params["layers_1"]["mlp"]["out"].at[7].set(0.0)
  reference = models.apply(cfg, zeroed, tokens)
  np.testing.assert_allclose(scaled, reference, rtol=0, atol=_logit_atol(cfg, reference, 12))


def test_tokens_must_be_two_dimensional():
  cfg, params = _setup("gemma2_tiny")
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    models.apply(cfg, params, np.arange(5))


# Parameter totals as published (docs/models.md gives each source): the safetensors totals of the
# Hugging Face releases, and the Gemma 3 technical report's non-embedding counts (Table 1, in
# millions) for the Gemma-3 text decoders.
PUBLISHED_TOTALS = {
    "smollm2_135m": 134_515_008, "smollm2_360m": 361_821_120, "smollm2_1_7b": 1_711_376_384,
    "llama2_7b": 6_738_415_616, "llama3_1_8b": 8_030_261_248, "llama3_1_70b": 70_553_706_496,
    "mistral_7b": 7_241_732_096, "qwen2_7b": 7_615_616_512, "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
}
GEMMA3_REPORT_NON_EMBEDDING_MILLIONS = {"gemma3_1b": 698, "gemma3_4b": 3_209,
                                        "gemma3_12b": 10_759, "gemma3_27b": 25_600}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_TOTALS))
def test_param_count_equals_the_published_total(preset):
  assert models.param_count(models.get_config(preset))["total"] == PUBLISHED_TOTALS[preset]


@pytest.mark.parametrize("preset", sorted(GEMMA3_REPORT_NON_EMBEDDING_MILLIONS))
def test_gemma3_non_embedding_count_rounds_to_the_report(preset):
  counts = models.param_count(models.get_config(preset))
  millions = (counts["total"] - counts["embedding"]) / 1e6
  assert round(millions) == GEMMA3_REPORT_NON_EMBEDDING_MILLIONS[preset], millions
