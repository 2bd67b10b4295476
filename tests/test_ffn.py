"""The FFN vocabulary (maxnucl/ffn.py): layer names and the one row-entropy with its zero-row
rule, shared by the loss, the pruner and inspect."""

import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import ffn, losses
from tolerances import EPS32, EPS64, magnitude, rounding_atol


def _entropy_terms(columns):
  """Roundings of a row's entropy -sum r log r: |w|'s cast and division by the row's max, the
  normalising sum (columns), the log, r log r (2), their sum (columns), the division and the
  final addition.  Its terms -r log r are >= 0, so the entropy itself is their magnitude."""
  return 2 * columns + 7


def test_row_entropy_definition_and_zero_row_rule():
  w = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                [1.0, -1.0, 2.0, 0.0], [1e-40, 0.0, -1e-40, 0.0]])
  h = ffn.row_entropy(w)
  r = np.array([0.25, 0.25, 0.5])
  expected = [np.log(4), 0.0, np.log(4), -(r * np.log(r)).sum(), np.log(4)]
  np.testing.assert_allclose(h, expected, rtol=0,  # float64 (tests/tolerances.py)
                             atol=rounding_atol(magnitude(expected), _entropy_terms(4), EPS64))


def test_row_entropy_equals_the_loss_entropy_rows_including_zero_rows():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((300, 48)) * rng.uniform(0.01, 10, (300, 1))
  w[3] = 0.0
  w[7, :40] = 0.0  # a row with exact zeros
  w[11] = 1e-38  # below the zero-row threshold
  expected = ffn.row_entropy(w, block_rows=64)  # float64; the loss's rows are float32
  np.testing.assert_allclose(np.asarray(losses.nucl_rows(jnp.asarray(w, jnp.float32), "ent")),
                             expected, rtol=0,
                             atol=rounding_atol(magnitude(expected), _entropy_terms(48), EPS32))


def test_layer_names_round_trip_and_bad_names_are_named():
  assert [ffn.layer_index(ffn.layer_name(i)) for i in (0, 7, 41)] == [0, 7, 41]
  assert ffn.layer_names(3) == ["layers_0", "layers_1", "layers_2"]
  assert ffn.ffn_layer_names((8, 0, 4)) == ["layers_0", "layers_2"]
  with pytest.raises(ValueError, match="'layer_3' is not a layer name"):
    ffn.layer_index("layer_3")
  with pytest.raises(ValueError, match="layer index 5 in \\[1, 5\\] is not a layer"):
    ffn.layer_names(4, [1, 5])
