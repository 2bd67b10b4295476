"""Specification of maxnucl/models/ffn_allocation.py: per-layer FFN widths at the uniform model's
FFN parameter budget (Ikeda et al. 2025: FFNs concentrated in the middle ~70% of layers)."""

import itertools

import gin
import jax
import numpy as np
import pytest

from maxnucl import models
from maxnucl.models.ffn_allocation import allocate_ffn_widths, ffn_block

# num_layers -> the middle block at fraction 0.7 (round half up; an odd outer layer goes on top).
MIDDLE_BLOCKS = {
    4: range(0, 3),    # 2.8 -> 3
    6: range(1, 5),    # 4.2 -> 4
    8: range(1, 7),    # 5.6 -> 6
    12: range(2, 10),  # 8.4 -> 8
    24: range(3, 20),  # 16.8 -> 17
    26: range(4, 22),  # 18.2 -> 18
    40: range(6, 34),  # 28
    42: range(6, 35),  # 29.4 -> 29
}


@pytest.mark.parametrize("num_layers, block", sorted(MIDDLE_BLOCKS.items()))
def test_middle_scheme_keeps_ffns_exactly_in_the_middle_block(num_layers, block):
  assert ffn_block(num_layers) == block
  widths = allocate_ffn_widths(num_layers, 256)
  assert [i for i, w in enumerate(widths) if w] == list(block)
  assert sum(widths) == num_layers * 256
  assert max(widths) - min(widths[i] for i in block) <= 1  # spread evenly


@pytest.mark.parametrize("scheme", ["uniform", "first", "middle", "last"])
def test_every_scheme_keeps_the_total_ffn_width_exactly(scheme):
  for num_layers, base_width, fraction, outer_width in itertools.product(
      [1, 2, 3, 4, 5, 6, 7, 8, 13, 26, 42, 46], [1, 7, 96, 9216], [0.3, 0.5, 0.7, 1.0], [0, 1]):
    if scheme != "uniform" and fraction * num_layers < 0.5:
      continue  # no block layers: an error (test_bad_arguments_are_named)
    widths = allocate_ffn_widths(num_layers, base_width, scheme=scheme, fraction=fraction,
                                 outer_width=outer_width)
    case = (num_layers, base_width, fraction, outer_width)
    assert len(widths) == num_layers and sum(widths) == num_layers * base_width, case
    assert all(type(w) is int and w >= 0 for w in widths), case


def test_remainders_go_to_the_lowest_block_layers_and_outer_width_is_kept():
  assert allocate_ffn_widths(4, 10) == [14, 13, 13, 0]
  assert allocate_ffn_widths(8, 100, outer_width=20) == [20, 127, 127, 127, 127, 126, 126, 20]
  assert allocate_ffn_widths(6, 10, scheme="first") == [15, 15, 15, 15, 0, 0]
  assert allocate_ffn_widths(6, 10, scheme="last") == [0, 0, 15, 15, 15, 15]
  assert allocate_ffn_widths(5, 10, fraction=0.5) == [0, 17, 17, 16, 0]  # 2.5 -> 3 layers


def test_uniform_scheme_and_fraction_one_are_the_identity():
  assert allocate_ffn_widths(26, 9216, scheme="uniform") == [9216] * 26
  assert allocate_ffn_widths(26, 9216, fraction=1.0) == [9216] * 26
  cfg = models.get_config("gemma2_2b")
  assert allocate_ffn_widths(cfg, scheme="uniform") == list(cfg.layer_ffn_widths)
  assert cfg.replace(ffn_widths=allocate_ffn_widths(cfg, scheme="uniform")).layer_ffn_widths == \
      cfg.layer_ffn_widths


def test_multiple_of_keeps_the_total_when_it_can_and_warns_with_the_closest_otherwise():
  widths = allocate_ffn_widths(26, 9216, multiple_of=128)
  assert sum(widths) == 26 * 9216 and all(w % 128 == 0 for w in widths)
  widths = allocate_ffn_widths(8, 96, multiple_of=32)  # 768 = 24 multiples over 6 layers
  assert widths == [0, 128, 128, 128, 128, 128, 128, 0]
  widths = allocate_ffn_widths(8, 100, multiple_of=32)  # 800 = 25 multiples over 6 layers
  assert widths == [0, 160, 128, 128, 128, 128, 128, 0] and sum(widths) == 800
  with pytest.warns(UserWarning, match="sum to 39 instead of 40 \\(-1\\)"):
    assert allocate_ffn_widths(4, 10, multiple_of=3) == [15, 12, 12, 0]  # 40/3: 13 multiples
  with pytest.warns(UserWarning, match="sum to 42 instead of 40 \\(\\+2\\)"):
    assert allocate_ffn_widths(4, 10, multiple_of=6) == [18, 12, 12, 0]  # 40/6 = 6.67 -> 7


def test_a_model_config_gives_depth_and_default_width():
  cfg = models.get_config("gemma2_9b")
  widths = allocate_ffn_widths(cfg)
  assert widths == allocate_ffn_widths(42, 14336)
  assert [i for i, w in enumerate(widths) if w] == list(MIDDLE_BLOCKS[42])
  assert models.param_count(cfg.replace(ffn_widths=widths))["ffn"] == models.param_count(cfg)["ffn"]
  assert allocate_ffn_widths(cfg, base_width=1024) == allocate_ffn_widths(42, 1024)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_tiny_gemma2_with_allocated_widths_builds_and_runs_forward(scan_layers):
  base = models.get_config("gemma2_tiny", num_layers=6, scan_layers=scan_layers)
  widths = allocate_ffn_widths(base)
  assert widths == [0, 384, 384, 384, 384, 0]
  cfg = base.replace(ffn_widths=widths)
  params = models.init(cfg, jax.random.PRNGKey(0))
  assert "mlp" not in params["layers_0"] and "mlp" not in params["layers_5"]
  assert params["layers_1"]["mlp"]["out"].shape == (384, cfg.d_model)
  assert models.param_count(cfg)["ffn"] == models.param_count(base)["ffn"]
  logits = models.apply(cfg, params, np.arange(3, 14)[None])
  assert logits.shape == (1, 11, cfg.vocab_size) and np.all(np.isfinite(logits))


def test_gin_binds_the_allocation_as_the_model_widths():
  gin.clear_config()
  try:
    gin.parse_config("""
        import maxnucl.models.ffn_allocation
        model_config.preset = 'gemma2_tiny'
        model_config.ffn_widths = @allocate_ffn_widths()
        allocate_ffn_widths.cfg_or_num_layers = 4
        allocate_ffn_widths.base_width = 256
        allocate_ffn_widths.fraction = 0.5
    """)
    cfg = models.configured_model()
  finally:
    gin.clear_config()
  assert cfg.layer_ffn_widths == (0, 512, 512, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg_or_num_layers=0, base_width=8), "cfg_or_num_layers = 0"),
    (dict(cfg_or_num_layers=4.0, base_width=8), "cfg_or_num_layers = 4.0"),
    (dict(cfg_or_num_layers=4), "base_width is required"),
    (dict(cfg_or_num_layers=4, base_width=-1), "base_width = -1"),
    (dict(cfg_or_num_layers=4, base_width=8, scheme="centre"), "scheme = 'centre'"),
    (dict(cfg_or_num_layers=4, base_width=8, fraction=0.0), r"fraction = 0.0.*\(0, 1\]"),
    (dict(cfg_or_num_layers=4, base_width=8, fraction=1.5), "fraction = 1.5"),
    (dict(cfg_or_num_layers=4, base_width=8, fraction=float("nan")), "fraction = nan"),
    (dict(cfg_or_num_layers=4, base_width=8, fraction=True), "fraction = True"),
    (dict(cfg_or_num_layers=1, base_width=8, fraction=0.3), "rounds to zero layers"),
    (dict(cfg_or_num_layers=4, base_width=8, outer_width=9), "outer_width = 9 exceeds"),
    (dict(cfg_or_num_layers=4, base_width=8, outer_width=-2), "outer_width = -2"),
    (dict(cfg_or_num_layers=4, base_width=8, multiple_of=0), "multiple_of = 0"),
    (dict(cfg_or_num_layers=4, base_width=8, multiple_of=16), "multiple_of = 16 leaves"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    allocate_ffn_widths(**kwargs)


def test_ffn_block_names_a_scheme_without_a_block():
  with pytest.raises(ValueError, match="scheme = 'uniform' has no block"):
    ffn_block(8, scheme="uniform")
