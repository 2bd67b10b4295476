"""Hugging Face conversion of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
Gemma3ForCausalLM (text), both directions, against transformers on odd tiny shapes.

Each architecture is a random transformers model (every weight redrawn at a noticeable scale,
norm weights perturbed) of d = 40, 5 query heads over 1 KV head of 8 dims, FFN 72, vocabulary
131, exercising what sets it apart: Llama with llama3 RoPE scaling and an untied head, Mistral
with a sliding window shorter than the sequence, Qwen2 with q/k/v biases and a tied head,
Gemma-3 with 7 layers (local and global ones) and linear scaling on the global layers.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from maxnucl import checkpoints, models
from maxnucl.conversion import cli, convert, hf_architectures, hf_custom_code, hf_io
from hf_reference import with_ffn_widths
from tolerances import decoder_terms, magnitude, rounding_atol

LENGTH = 20  # longer than every sliding window below (6)
TOKENS = np.random.default_rng(0).integers(0, 131, size=(2, LENGTH))
SHAPE = dict(vocab_size=131, hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
             head_dim=8, intermediate_size=72, max_position_embeddings=64)

# architecture -> (transformers config class, its fields beyond SHAPE, per-layer FFN widths of
# the pruned variant: unequal, one FFN-less layer)
CASES = {
    "LlamaForCausalLM": (transformers.LlamaConfig, dict(
        num_hidden_layers=3, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         # wavelengths of 8-dim heads straddle 16 / 4 = 4 and 16: every branch
                         "original_max_position_embeddings": 16}),
        (72, 0, 30)),
    "MistralForCausalLM": (transformers.MistralConfig, dict(
        num_hidden_layers=3, sliding_window=6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}), (20, 72, 0)),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, dict(
        num_hidden_layers=3, tie_word_embeddings=True, bos_token_id=5, eos_token_id=[7, 8],
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}), (0, 50, 72)),
    "Gemma3ForCausalLM": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=7, sliding_window=6, query_pre_attn_scalar=12,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        (72, 40, 0, 72, 16, 0, 72)),
}
ARCHITECTURES = list(CASES)


def tiny_hf_model(architecture: str, seed: int = 0):
  """A random transformers model of CASES[architecture] with every weight redrawn: matrices
  N(0, 0.3^2), biases N(0, 0.3^2), norm weights around the value that leaves the input
  unscaled (Llama's w = 1, Gemma's 1 + w: w = 0) with std 0.5."""
  config_class, fields, _ = CASES[architecture]
  config = config_class(**SHAPE, **fields)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, architecture)(config).eval()
  unit = 0.0 if "Gemma" in architecture else 1.0
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(unit, 0.5)
      else:
        p.normal_(0.0, 0.3)
  return model


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def maxnucl_logits(ckpt) -> np.ndarray:
  cfg, params = checkpoints.load(ckpt, dtype="float32")
  return np.asarray(models.apply(cfg, params, TOKENS))


def assert_logits_close(actual, expected, cfg):
  """Two float32 computations of the logits of TOKENS differ by the rounding along a logit's
  path (tests/tolerances.py); cfg: the wider of the two models."""
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rounding_atol(
      magnitude(actual, expected), decoder_terms(cfg, LENGTH)))


def load_hf(directory, **kwargs):
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager", dtype=torch.float32, **kwargs).eval()


def hf_tensors(directory) -> dict[str, np.ndarray]:
  reader = hf_io.SafetensorsReader(directory)
  return {name: np.asarray(reader.get(name)) for name in reader.names()}


def flat(params):
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def run_cli(capsys, *args) -> tuple[int, str, str]:
  code = cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """architecture -> (tiny_hf_model, the directory its save_pretrained wrote)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for architecture in ARCHITECTURES:
    model = tiny_hf_model(architecture)
    model.save_pretrained(root / architecture)
    out[architecture] = model, root / architecture
  return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def converted(request, hf_models, tmp_path_factory):
  """(architecture, HF model, its saved directory, the maxnucl checkpoint `maxnucl-convert
  hf-to-maxnucl` made of it, transformers' logits of TOKENS)."""
  architecture = request.param
  model, hf_dir = hf_models[architecture]
  ckpt = tmp_path_factory.mktemp(architecture) / "ckpt"
  assert cli.main(["hf-to-maxnucl", "--input", str(hf_dir), "--output", str(ckpt),
                   "--dtype", "float32"]) == 0
  return architecture, model, hf_dir, ckpt, hf_logits(model)


# ---- Hugging Face -> maxnucl ---------------------------------------------------------------------

def test_config_json_selects_the_architecture(converted):
  architecture, model, hf_dir, ckpt, _ = converted
  config = json.loads((hf_dir / "config.json").read_text())
  assert hf_architectures.detect(config).architecture == architecture
  assert hf_architectures.detect({"model_type": config["model_type"]}).architecture == (
      architecture)
  cfg = checkpoints.load_config(ckpt)
  assert cfg.family == ("gemma3" if architecture == "Gemma3ForCausalLM" else "llama")
  assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
      40, 5, 1, 8, 131)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert cfg.qkv_bias == (architecture == "Qwen2ForCausalLM")


def test_hf_to_maxnucl_logits_equal_transformers(converted):
  _, _, _, ckpt, reference = converted
  logits = maxnucl_logits(ckpt)
  assert_logits_close(logits, reference, checkpoints.load_config(ckpt))


def test_reference_exercises_what_sets_each_architecture_apart(converted):
  """The models above differ from a plain global-attention Llama where it matters: windows
  shorter than the sequence on local layers, both kinds of Gemma-3 layer, scaled RoPE."""
  architecture, _, _, ckpt, _ = converted
  cfg = checkpoints.load_config(ckpt)
  kinds = set(cfg.layer_attention_kinds)
  expected = {"LlamaForCausalLM": {"global"}, "MistralForCausalLM": {"local"},
              "Qwen2ForCausalLM": {"global"}, "Gemma3ForCausalLM": {"local", "global"}}
  assert kinds == expected[architecture]
  if "local" in kinds:
    assert cfg.sliding_window < LENGTH
  scaling = {"LlamaForCausalLM": ("llama3", 8.0, 1.0, 4.0, 16),
             "Gemma3ForCausalLM": ("linear", 8.0)}.get(architecture)
  assert cfg.rope_scaling == scaling
  if architecture == "Gemma3ForCausalLM":
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.qk_norm) == (1e6, 1e4, True)
  if architecture == "Qwen2ForCausalLM":
    assert (cfg.bos_id, cfg.eos_id) == (5, 7)  # eos_token_id [7, 8]: the first


MISTAKES = {  # architecture -> a ModelConfig change that a parity test must catch
    "LlamaForCausalLM": dict(rope_scaling=None),  # llama3 scaling skipped
    "MistralForCausalLM": dict(sliding_window=7),  # window off by one
    "Qwen2ForCausalLM": dict(rope_theta=10_000.0),  # RoPE base not read
    "Gemma3ForCausalLM": dict(rope_local_theta=None),  # local layers on the global RoPE
}


def test_parity_check_detects_classic_mistakes(converted):
  """The parity test above is sharp: each architecture's pitfall moves logits far beyond its
  tolerance."""
  architecture, _, _, ckpt, reference = converted
  cfg, params = checkpoints.load(ckpt, dtype="float32")
  wrong = np.asarray(models.apply(cfg.replace(**MISTAKES[architecture]), params, TOKENS))
  bound = rounding_atol(magnitude(reference), decoder_terms(cfg, LENGTH))
  assert np.abs(wrong - reference).max() > 100 * bound


# ---- maxnucl -> Hugging Face ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
  """The converted checkpoint written back by `maxnucl-convert maxnucl-to-hf`."""
  architecture, _, _, ckpt, _ = converted
  out = tmp_path_factory.mktemp(f"{architecture}_export") / "hf"
  assert cli.main(["maxnucl-to-hf", "--input", str(ckpt), "--output", str(out),
                   "--vocab", "none"]) == 0
  return out


def test_maxnucl_to_hf_loads_as_the_architecture_with_maxnucl_logits(converted, exported):
  architecture, _, _, ckpt, _ = converted
  model = load_hf(exported)
  assert type(model).__name__ == architecture
  assert json.loads((exported / "config.json").read_text())["architectures"] == [architecture]
  assert_logits_close(hf_logits(model), maxnucl_logits(ckpt), checkpoints.load_config(ckpt))


def test_round_trip_hf_to_maxnucl_to_hf_is_exact(converted, exported, tmp_path):
  _, _, hf_dir, ckpt, _ = converted
  original, back = hf_tensors(hf_dir), hf_tensors(exported)
  assert back.keys() == original.keys()
  for name, array in original.items():
    assert back[name].dtype == array.dtype, name
    np.testing.assert_array_equal(back[name], array, err_msg=name)
  convert.hf_to_maxnucl(exported, tmp_path / "again")  # and maxnucl -> HF -> maxnucl
  again, ours = (flat(checkpoints.load(p)[1]) for p in (tmp_path / "again", ckpt))
  assert again.keys() == ours.keys()
  for key, array in ours.items():
    np.testing.assert_array_equal(again[key], array, err_msg="/".join(key))
  cfg = checkpoints.load_config(ckpt)
  assert checkpoints.load_config(tmp_path / "again").replace(name=cfg.name) == cfg


# ---- per-layer FFN widths ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(converted, tmp_path_factory):
  """(architecture, widths, pruned checkpoint, its maxnucl logits, mode -> its export)."""
  architecture, _, _, ckpt, _ = converted
  widths = CASES[architecture][2]
  root = tmp_path_factory.mktemp(f"{architecture}_pruned")
  cfg, params = with_ffn_widths(*checkpoints.load(ckpt), widths)
  checkpoints.save(root / "ckpt", cfg, params)
  exports = {}
  for mode in ("pad", "custom_code"):
    exports[mode] = root / mode
    convert.maxnucl_to_hf(root / "ckpt", exports[mode], ffn_widths_export=mode)
  return architecture, widths, root / "ckpt", maxnucl_logits(root / "ckpt"), exports


def test_pad_export_is_the_plain_architecture_with_maxnucl_logits(pruned):
  architecture, widths, ckpt, logits, exports = pruned
  config = json.loads((exports["pad"] / "config.json").read_text())
  assert config["architectures"] == [architecture] and "auto_map" not in config
  assert config["intermediate_size"] == max(widths)
  model = load_hf(exports["pad"])
  assert type(model).__name__ == architecture
  tensors = hf_tensors(exports["pad"])
  for i, width in enumerate(widths):  # zero neurons beyond each layer's width
    down = tensors[f"model.layers.{i}.mlp.down_proj.weight"]
    assert down.shape[1] == max(widths) and not down[:, width:].any()
  padded = checkpoints.load_config(ckpt).replace(ffn_widths=None, ffn_dim=max(widths))
  assert_logits_close(hf_logits(model), logits, padded)


def test_custom_code_export_has_each_layer_at_its_width_and_maxnucl_logits(pruned):
  architecture, widths, ckpt, logits, exports = pruned
  config = json.loads((exports["custom_code"] / "config.json").read_text())
  code = hf_architectures.BY_NAME[architecture].custom_code
  assert config["architectures"] == [code.architecture] and config["auto_map"] == code.auto_map
  assert config["intermediate_sizes"] == list(widths)
  for name, text in code.sources().items():
    assert (exports["custom_code"] / name).read_text() == text
  model = load_hf(exports["custom_code"], trust_remote_code=True)
  assert type(model).__name__ == code.architecture
  cfg = checkpoints.load_config(ckpt)
  # the pruned model's own parameters: no padding, no FFN (nor FFN norm) in a width-0 layer
  assert sum(p.numel() for p in model.parameters()) == models.param_count(cfg)["total"]
  for layer, width in zip(model.model.layers, widths):
    assert sum(p.numel() for p in layer.mlp.parameters()) == 3 * width * cfg.d_model
  assert_logits_close(hf_logits(model), logits, cfg.replace(ffn_widths=None,
                                                             ffn_dim=max(widths)))


def test_custom_code_export_round_trips_the_pruned_checkpoint(pruned, tmp_path):
  _, widths, ckpt, _, exports = pruned
  convert.hf_to_maxnucl(exports["custom_code"], tmp_path / "back")
  cfg = checkpoints.load_config(ckpt)
  assert checkpoints.load_config(tmp_path / "back").replace(name=cfg.name) == cfg
  back, ours = (flat(checkpoints.load(p)[1]) for p in (tmp_path / "back", ckpt))
  assert back.keys() == ours.keys()
  for key, array in ours.items():
    np.testing.assert_array_equal(back[key], array, err_msg="/".join(key))


def test_every_architecture_has_its_custom_code_model_in_the_package():
  for spec in hf_architectures.ARCHITECTURES:
    module = spec.custom_code.model_module
    assert f"class {spec.custom_code.architecture}(" in spec.custom_code.sources()[
        f"{module}.py"]
  assert hf_custom_code.AUTO_MAP == hf_custom_code.GEMMA2.auto_map  # Gemma-2's names unchanged


# ---- config.json fields --------------------------------------------------------------------------

def _cfg(config_class, **fields):
  """maxnucl's ModelConfig of the config.json transformers writes for these fields."""
  config = config_class(**SHAPE, num_hidden_layers=7, **fields)
  config.architectures = None  # detected from model_type
  return hf_architectures.detect(config.to_dict()).config_from_hf(config.to_dict(), "x")


def test_mistral_without_window_and_qwen2_without_sliding_are_global():
  assert _cfg(transformers.MistralConfig, sliding_window=None).layer_attention_kinds == (
      ("global",) * 7)
  assert _cfg(transformers.MistralConfig, sliding_window=6).layer_windows == (6,) * 7
  assert _cfg(transformers.Qwen2Config, use_sliding_window=False,
              sliding_window=6).layer_attention_kinds == ("global",) * 7
  qwen = _cfg(transformers.Qwen2Config, use_sliding_window=True, sliding_window=6,
              max_window_layers=4)  # transformers: layers 4.. are local
  assert qwen.layer_windows == (None,) * 4 + (6,) * 3


def test_gemma3_older_rope_keys_read_as_transformers_reads_them():
  old = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", **SHAPE,
             num_hidden_layers=7, rope_theta=50_000.0, rope_local_base_freq=2_000.0,
             rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=3)
  ours = hf_architectures.detect(old).config_from_hf(old, "x")
  theirs = transformers.Gemma3TextConfig(**{k: v for k, v in old.items()
                                            if k not in ("architectures", "model_type")})
  assert ours == hf_architectures.detect(old).config_from_hf(theirs.to_dict(), "x")
  assert (ours.rope_theta, ours.rope_local_theta, ours.rope_scaling) == (
      50_000.0, 2_000.0, ("linear", 4.0))
  assert ours.layer_attention_kinds == ("local", "local", "global") * 2 + ("local",)
  assert ours.attention_pattern == ("local", "local", "global")  # one period: scanned


def test_llama_older_rope_keys_and_absent_head_dim():
  old = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=131,
             hidden_size=40, num_attention_heads=5, num_hidden_layers=2, intermediate_size=72,
             rope_theta=500_000.0, rope_scaling={"type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32})
  cfg = hf_architectures.detect(old).config_from_hf(old, "x")
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings) == (8, 5, False)
  assert (cfg.rope_theta, cfg.rope_scaling) == (500_000.0, ("llama3", 8.0, 1.0, 4.0, 32))


@pytest.mark.parametrize("architecture, change, field", [
    ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                              "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ("MistralForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type"),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True},
     "use_bidirectional_attention"),
    ("Gemma3ForCausalLM", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention.rope_type"),
    ("Gemma3ForCausalLM", {"architectures": ["Gemma3ForConditionalGeneration"]},
     "architectures"),
    ("LlamaForCausalLM", {"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_unrepresentable_config_field_is_refused_in_one_line_naming_it(
    hf_models, architecture, change, field, tmp_path, capsys):
  hf_dir = hf_models[architecture][1]
  bad = tmp_path / "bad"
  bad.mkdir()
  config = json.loads((hf_dir / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, **change}))
  (bad / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
  code, _, err = run_cli(capsys, "hf-to-maxnucl", "--input", bad, "--output", tmp_path / "out")
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert str(bad / "config.json") in lines[0] and field in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


def test_export_refuses_what_no_architecture_holds(tmp_path):
  cfg = models.get_config("llama_tiny", attention_pattern=("local", "global"), sliding_window=8)
  with pytest.raises(ValueError, match=r"Qwen2ForCausalLM: qkv_bias = False.*"
                                       r"MistralForCausalLM: attention_pattern.*"
                                       r"LlamaForCausalLM: attention_pattern"):
    hf_architectures.for_model(cfg)
  with pytest.raises(ValueError, match="family 'palm'"):
    hf_architectures.for_model(models.get_config("palm_tiny"))


# ---- config.json fields left out read as transformers reads them -----------------------------------

def tiny_gemma2(directory):
  """A tiny random transformers Gemma-2 of SHAPE (3 layers), saved to `directory`; its
  (transformers model, directory)."""
  from hf_reference import tiny_hf_gemma2  # pylint: disable=import-outside-toplevel
  model = tiny_hf_gemma2(seed=5, **SHAPE, num_hidden_layers=3)
  model.save_pretrained(directory)
  return model, directory


# The fields a config.json cannot leave out: transformers' defaults for them describe another
# model than the tensors (its default sizes), and the model_type chooses the config class.
REQUIRED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "model_type"}
# Fields whose transformers default gives other tensor shapes than the tiny models': a
# directory without them holds another model (refused by the shape check)
SHAPE_FIELDS = {"head_dim", "num_key_value_heads"}


@pytest.fixture(scope="module")
def all_models(hf_models, tmp_path_factory):
  """hf_models and a tiny Gemma-2 of the same SHAPE."""
  return {**hf_models,
          "Gemma2ForCausalLM": tiny_gemma2(tmp_path_factory.mktemp("gemma2") / "gemma2")}


def optional_fields(config):
  """Every field of `config` that transformers' config class has a default for (all but
  REQUIRED)."""
  return sorted(set(config) - REQUIRED)


def with_config(tmp_path, hf_dir, config, name="dir"):
  directory = tmp_path / name
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config))
  (directory / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
  return directory


@pytest.mark.parametrize("architecture", ["Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                          "LlamaForCausalLM", "MistralForCausalLM",
                                          "Qwen2ForCausalLM"])
def test_each_absent_optional_field_reads_as_transformers_default(all_models, architecture,
                                                                  tmp_path):
  """config.json without one optional field: maxnucl's ModelConfig is the one transformers'
  own config class (with its default for the field) describes."""
  hf_dir = all_models[architecture][1]
  config = json.loads((hf_dir / "config.json").read_text())
  fields = optional_fields(config)
  assert "rms_norm_eps" in fields and "rope_parameters" in fields
  for field in fields:
    directory = with_config(tmp_path, hf_dir, {k: v for k, v in config.items() if k != field},
                            field)
    theirs = transformers.AutoConfig.from_pretrained(directory).to_dict()
    try:
      ours = convert.read_hf_config(directory)[0]
    except convert.ConversionError:  # e.g. Qwen2's default of 32 KV heads for 5 query heads
      assert field in SHAPE_FIELDS, field  # a default that contradicts the tensors' shapes
      continue
    assert ours == hf_architectures.detect(theirs).config_from_hf(theirs, ours.name), field


@pytest.mark.parametrize("architecture", ["Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                          "LlamaForCausalLM"])
def test_absent_optional_fields_give_transformers_logits(all_models, architecture, tmp_path):
  """Every optional field the tensors do not fix dropped at once (soft-caps, query scaling,
  window, RoPE, epsilon, ...): maxnucl's conversion computes transformers' logits on the same
  directory."""
  hf_dir = all_models[architecture][1]
  config = json.loads((hf_dir / "config.json").read_text())
  dropped = set(optional_fields(config)) - SHAPE_FIELDS
  directory = with_config(tmp_path, hf_dir, {k: v for k, v in config.items()
                                             if k not in dropped})
  assert cli.main(["hf-to-maxnucl", "--input", str(directory), "--output",
                   str(tmp_path / "ckpt")]) == 0
  expected = hf_logits(load_hf(directory))
  before = hf_logits(all_models[architecture][0])
  if architecture == "Gemma2ForCausalLM":  # the defaults (caps 50 / 30, ...) make another model
    assert not np.allclose(expected, before)
  cfg = checkpoints.load_config(tmp_path / "ckpt")
  assert_logits_close(maxnucl_logits(tmp_path / "ckpt"), expected, cfg)


# ---- config.json fields of the wrong type or range ------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("attn_logit_softcapping", "x"), ("final_logit_softcapping", float("nan")),
    ("rms_norm_eps", -1.0), ("rms_norm_eps", None), ("head_dim", True), ("vocab_size", 10**12),
    ("num_hidden_layers", 10**12), ("num_hidden_layers", 1.5), ("sliding_window", -4),
    ("layer_types", float("nan")), ("layer_types", [[]]), ("rope_parameters", "x"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": {}}),
    ("architectures", 10**12), ("eos_token_id", {}), ("pad_token_id", 10**6),
    ("tie_word_embeddings", "yes"), ("query_pre_attn_scalar", 0), ("max_position_embeddings", []),
])
def test_wrong_typed_config_field_is_refused_in_one_line_naming_it(all_models, field, value,
                                                                   tmp_path, capsys):
  hf_dir = all_models["Gemma2ForCausalLM"][1]
  config = json.loads((hf_dir / "config.json").read_text())
  directory = with_config(tmp_path, hf_dir, {**config, field: value})
  code, _, err = run_cli(capsys, "hf-to-maxnucl", "--input", directory, "--output",
                         tmp_path / "out")
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert str(directory / "config.json") in lines[0] and field in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


# ---- the declared architecture against the tensors --------------------------------------------------

TENSOR_FAMILY = {"Gemma2ForCausalLM": "Gemma-2", "Gemma3ForCausalLM": "Gemma-3",
                 "Qwen2ForCausalLM": "Qwen2", "LlamaForCausalLM": "Llama/Mistral",
                 "MistralForCausalLM": "Llama/Mistral"}


@pytest.mark.parametrize("declared", list(TENSOR_FAMILY))
def test_config_declaring_another_architecture_than_the_tensors_is_refused(
    all_models, declared, tmp_path, capsys):
  """Each architecture's config.json (model_type and architectures consistent) over every other
  family's tensors (the layer count adjusted): refused in one line naming what config.json
  declares and what the tensors are."""
  config = json.loads((all_models[declared][1] / "config.json").read_text())
  for source, (model, hf_dir) in all_models.items():
    if TENSOR_FAMILY[source] == TENSOR_FAMILY[declared]:
      continue
    mutant = {k: v for k, v in config.items() if k not in ("layer_types",)}
    mutant["num_hidden_layers"] = model.config.num_hidden_layers
    directory = with_config(tmp_path, hf_dir, mutant, source)
    code, _, err = run_cli(capsys, "hf-to-maxnucl", "--input", directory, "--output",
                           tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (source, err)
    assert str(directory / "config.json") in lines[0], lines[0]
    assert f"declares {declared}" in lines[0], lines[0]
    assert f"tensors are {TENSOR_FAMILY[source]}'s" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gemma", "gemma3", "gemma3_text", "llama", "mistral",
                                        "qwen2", "gemma2_ffn_widths"])
def test_model_type_disagreeing_with_architectures_is_refused(all_models, model_type, tmp_path,
                                                              capsys):
  """transformers builds the model model_type names: a config.json whose architectures say
  otherwise (or a model_type maxnucl does not convert) is refused, naming both."""
  hf_dir = all_models["Gemma2ForCausalLM"][1]
  config = json.loads((hf_dir / "config.json").read_text())
  directory = with_config(tmp_path, hf_dir, {**config, "model_type": model_type})
  code, _, err = run_cli(capsys, "hf-to-maxnucl", "--input", directory, "--output",
                         tmp_path / "out")
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert str(directory / "config.json") in lines[0] and "model_type" in lines[0], lines[0]
  assert model_type in lines[0]
