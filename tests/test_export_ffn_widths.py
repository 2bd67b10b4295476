"""Hugging Face export of models with per-layer FFN widths (pruned: widths differ, 0 = no FFN).

`maxnucl_to_hf(..., ffn_widths_export=...)`: "refuse" (default), "pad" (a plain
Gemma2ForCausalLM, every layer zero-padded to the widest width) and "custom_code" (each layer at
its width, model code in the directory).  Both exports must compute maxnucl's logits in
transformers.  The model is tests/hf_reference.py's tiny random Gemma-2 with its FFNs cut to
WIDTHS.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers

from maxnucl import checkpoints, models
from maxnucl.conversion import cli, convert, hf_custom_code, hf_gemma2, hf_io
from maxnucl.conversion import inspect as inspect_lib
from hf_reference import (TINY_HF_CONFIG, hf_logits, maxnucl_from_hf, tiny_hf_gemma2,
                          with_ffn_widths)
from tolerances import decoder_terms, magnitude, rounding_atol

REPO = pathlib.Path(__file__).absolute().parents[1]
WIDTHS = (96, 40, 0, 64)  # unequal, one FFN-less layer; the widest is the unpruned 96
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 16))  # longer than the window (6)


def _logit_atol(cfg, *logits):
  """Two float32 computations of the logits of TOKENS differ by their rounding along a logit's
  path (tests/tolerances.py); cfg is the wider of the two models (the padded one, if any)."""
  return rounding_atol(magnitude(*logits), decoder_terms(cfg, TOKENS.shape[1]))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
  """(checkpoint path, cfg, float32 maxnucl logits of TOKENS) of the tiny model cut to WIDTHS."""
  cfg, params = with_ffn_widths(*maxnucl_from_hf(tiny_hf_gemma2(seed=3)), WIDTHS)
  path = tmp_path_factory.mktemp("pruned") / "ckpt"
  checkpoints.save(path, cfg, params)
  cfg, params = checkpoints.load(path, dtype="float32")
  return path, cfg, np.asarray(models.apply(cfg, params, TOKENS))


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory):
  """mode -> Hugging Face directory of the pruned checkpoint exported in that mode."""
  root = tmp_path_factory.mktemp("exported")
  for mode in ("pad", "custom_code"):
    convert.maxnucl_to_hf(pruned[0], root / mode, ffn_widths_export=mode)
  return {"pad": root / "pad", "custom_code": root / "custom_code"}


def _custom_code_model(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, trust_remote_code=True, attn_implementation="eager", dtype=torch.float32).eval()


def _flat(params):
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _parameter_count(model):
  return sum(p.numel() for p in model.parameters())  # the tied lm_head counts once


# ---- "refuse", the default ------------------------------------------------------------------------

def test_default_refuses_per_layer_widths_naming_the_export_option(pruned, tmp_path):
  with pytest.raises(convert.ConversionError,
                     match=r"per-layer FFN widths \[96, 40, 0, 64\].*--ffn_widths_export.*'pad'"
                           r".*'custom_code'"):
    convert.maxnucl_to_hf(pruned[0], tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_cli_refuses_by_default_and_exports_with_the_option(pruned, tmp_path, capsys):
  parser = cli.build_parser()
  args = parser.parse_args(["maxnucl-to-hf", "--input", str(pruned[0]),
                            "--output", str(tmp_path / "hf")])
  assert args.ffn_widths_export == "refuse"
  with pytest.raises(convert.ConversionError, match="--ffn_widths_export"):
    args.fn(args)
  args = parser.parse_args(["maxnucl-to-hf", "--input", str(pruned[0]), "--output",
                            str(tmp_path / "hf"), "--ffn_widths_export", "custom_code"])
  args.fn(args)
  assert "wrote Hugging Face directory" in capsys.readouterr().out
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_sizes"] == list(
      WIDTHS)


# ---- "pad" ----------------------------------------------------------------------------------------

def test_pad_export_is_a_plain_gemma2_with_maxnucl_logits(pruned, exported):
  config = json.loads((exported["pad"] / "config.json").read_text())
  assert config["model_type"] == "gemma2" and "auto_map" not in config
  assert config["intermediate_size"] == max(WIDTHS)
  assert not any(p.suffix == ".py" for p in exported["pad"].iterdir())
  model = transformers.Gemma2ForCausalLM.from_pretrained(
      exported["pad"], attn_implementation="eager", dtype=torch.float32).eval()
  logits = hf_logits(model, TOKENS)
  np.testing.assert_allclose(logits, pruned[2], rtol=0,
                             atol=_logit_atol(pruned[1].replace(ffn_widths=None,
                                                                ffn_dim=max(WIDTHS)),
                                              logits, pruned[2]))


def test_pad_export_pads_with_zero_rows_of_gate_and_up_and_zero_columns_of_down(exported):
  reader = hf_io.SafetensorsReader(exported["pad"])
  for i, width in enumerate(WIDTHS):
    mlp = f"model.layers.{i}.mlp"
    gate, up, down = (np.asarray(reader.get(f"{mlp}.{name}.weight"))
                      for name in ("gate_proj", "up_proj", "down_proj"))
    assert gate.shape == up.shape == down.T.shape == (max(WIDTHS), TINY_HF_CONFIG["hidden_size"])
    assert not gate[width:].any() and not up[width:].any() and not down[:, width:].any()
    if width:  # the real neurons are kept
      assert gate[:width].all() and up[:width].all() and down[:, :width].all()


def test_pad_export_imports_as_the_padded_uniform_model(pruned, exported, tmp_path):
  cfg = convert.hf_to_maxnucl(exported["pad"], tmp_path / "back")
  assert cfg.ffn_widths is None and cfg.ffn_dim == max(WIDTHS)
  cfg, params = checkpoints.load(tmp_path / "back", dtype="float32")
  logits = np.asarray(models.apply(cfg, params, TOKENS))
  np.testing.assert_allclose(logits, pruned[2], rtol=0, atol=_logit_atol(cfg, logits, pruned[2]))


# ---- "custom_code" --------------------------------------------------------------------------------

def test_custom_code_export_loads_with_trust_remote_code_and_has_maxnucl_logits(pruned,
                                                                                exported):
  config = json.loads((exported["custom_code"] / "config.json").read_text())
  assert config["intermediate_sizes"] == list(WIDTHS)
  assert config["auto_map"] == hf_custom_code.AUTO_MAP
  for name, text in hf_custom_code.sources().items():  # the package's sources, copied
    assert (exported["custom_code"] / name).read_text() == text
  model = _custom_code_model(exported["custom_code"])
  assert type(model).__name__ == hf_custom_code.ARCHITECTURE
  assert [getattr(layer, "mlp", None) is None for layer in model.model.layers] == [
      w == 0 for w in WIDTHS]
  logits = hf_logits(model, TOKENS)
  np.testing.assert_allclose(logits, pruned[2], rtol=0,
                             atol=_logit_atol(pruned[1].replace(ffn_widths=None,
                                                                ffn_dim=max(WIDTHS)),
                                              logits, pruned[2]))


def test_custom_code_export_has_the_unpadded_parameter_count(pruned, exported):
  custom = _parameter_count(_custom_code_model(exported["custom_code"]))
  padded = _parameter_count(transformers.Gemma2ForCausalLM.from_pretrained(exported["pad"]))
  assert custom == models.param_count(pruned[1])["total"] < padded


def test_custom_code_export_round_trips_the_widths(pruned, exported, tmp_path):
  cfg = convert.hf_to_maxnucl(exported["custom_code"], tmp_path / "back")
  assert cfg.ffn_widths == WIDTHS
  original = checkpoints.load_config(pruned[0])
  assert cfg.replace(name=original.name) == original
  ours, back = (_flat(checkpoints.load(path)[1]) for path in (pruned[0], tmp_path / "back"))
  assert back.keys() == ours.keys()
  for key, array in ours.items():
    np.testing.assert_array_equal(back[key], array, err_msg="/".join(key))


def test_inspect_reads_the_custom_code_export(exported):
  summary = inspect_lib.inspect_checkpoint(exported["custom_code"])
  assert summary["ffn_widths"] == list(WIDTHS)
  assert [e["width"] for e in summary["outgoing_entropy"]] == [w for w in WIDTHS if w]


def test_uniform_widths_are_a_plain_gemma2_in_every_mode():
  cfg = models.get_config("gemma2_tiny", ffn_widths=(128,) * 4)
  for mode in hf_gemma2.FFN_WIDTHS_EXPORTS:
    export = hf_gemma2.hf_export(cfg, ffn_widths_export=mode)
    assert export.config["architectures"] == ["Gemma2ForCausalLM"] and not export.files
    assert export.config["intermediate_size"] == 128


def test_custom_code_sources_are_modules_of_a_package_the_wheel_ships():
  setuptools = pytest.importorskip("setuptools")
  # setup.py's package list: modules of these packages are what the wheel and sdist hold
  packages = setuptools.find_packages(str(REPO), include=["maxnucl", "maxnucl.*"])
  assert hf_custom_code.__name__ in packages
  for name in hf_custom_code.sources():
    assert (REPO / hf_custom_code.__name__.replace(".", "/") / name).is_file()
