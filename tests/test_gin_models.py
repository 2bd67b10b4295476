"""gin/models/*.gin give exactly the Python presets; gin/sharding/*.gin build valid meshes."""

import pathlib
import subprocess
import sys

import gin
import pytest

from maxnucl import models, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_FILES = sorted((ROOT / "gin" / "models").glob("*.gin"))
SHARDING_FILES = sorted((ROOT / "gin" / "sharding").glob("*.gin"))


def test_every_preset_has_a_gin_file():
  assert {p.stem for p in MODEL_FILES} == set(models.PRESETS)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_gin_file_gives_the_preset(path):
  gin.clear_config()
  gin.parse_config_file(str(path))
  cfg = models.configured_model()
  preset = models.get_config(path.stem)
  assert cfg.replace(dtype=preset.dtype, param_dtype=preset.param_dtype) == preset
  gin.clear_config()


def test_gin_field_overrides_reach_the_config():
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [str(ROOT / "gin/models/gemma2_tiny.gin")],
      ["model_config.num_layers = 2", "model_config.ffn_widths = (8, 0)"])
  assert models.configured_model().layer_ffn_widths == (8, 0)
  gin.clear_config()


@pytest.mark.parametrize("path", SHARDING_FILES, ids=lambda p: p.stem)
def test_sharding_gin_files_parse(path):
  gin.clear_config()
  gin.parse_config_file(str(path))
  rules = sharding.logical_axis_rules()
  assert dict(rules)["mlp"] == "tensor"
  if path.stem != "fsdp_tensor":  # needs a multiple of 8 devices with a tensor axis of 8
    mesh = sharding.create_mesh()
    assert mesh.devices.size == 8 or dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  gin.clear_config()


def test_summary_cli_prints_groups_and_rejects_unknown_preset():
  ok = subprocess.run([sys.executable, "-m", "maxnucl.summary", "gemma2_2b"],
                      capture_output=True, text=True, cwd=ROOT)
  assert ok.returncode == 0, ok.stderr
  assert "552,075,264" in ok.stdout and "2,614,341,888" in ok.stdout
  bad = subprocess.run([sys.executable, "-m", "maxnucl.summary", "gemma2_3b"],
                       capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode != 0 and "gemma2_3b" in bad.stderr
