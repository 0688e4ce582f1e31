"""The built-in cell generator: determinism, errors, and how hard it is."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from slamjax.data import synthetic


def test_cells_are_pure_functions_of_seed_class_and_index():
  a, la = synthetic.generate_cells({"normal": 3, "blast": 2}, 32, seed=5)
  b, lb = synthetic.generate_cells({"normal": 5, "blast": 2}, 32, seed=5)
  np.testing.assert_array_equal(a[:3], b[:3])  # more normals: same first three
  np.testing.assert_array_equal(a[3:], b[5:])  # and the same blasts
  assert la.tolist() == [0, 0, 0, 1, 1] and lb.tolist() == [0] * 5 + [1] * 2
  c, _ = synthetic.generate_cells({"normal": 3, "blast": 2}, 32, seed=6)
  assert not np.array_equal(a, c)


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match="Unknown morphology.*'plasma'.*valid"):
    synthetic.generate_cells({"plasma": 2}, 32)
  with pytest.raises(ValueError, match="image_size must be >= 16"):
    synthetic.generate_cells({"normal": 2}, 8)
  with pytest.raises(ValueError, match=r"num_per_class\['blast'\] must be >= 0"):
    synthetic.generate_cells({"normal": 2, "blast": -1}, 32)


def test_learnable_but_not_by_mean_colour_or_a_linear_pixel_model():
  # The design promise of the generator: blasts differ from normal cells in
  # texture and shape, not in mean intensity, so that a linear model on raw
  # pixels does only moderately (measured 0.76 here) while the pretrained
  # pipeline reaches a cell AUC of ~0.99 (README). A change that makes the
  # classes trivially separable, or not separable at all, fails this.
  x, y = synthetic.generate_cells({"normal": 300, "blast": 300}, 40, seed=3)
  assert 0.35 < roc_auc_score(y, x.reshape(len(x), -1).mean(1)) < 0.65
  pixels = x[:, 4:36, 4:36].reshape(len(x), -1) / 255.0
  idx = np.random.default_rng(0).permutation(len(x))
  train, test = idx[:400], idx[400:]
  clf = LogisticRegression(max_iter=3000).fit(pixels[train], y[train])
  auc = roc_auc_score(y[test], clf.predict_proba(pixels[test])[:, 1])
  assert 0.6 < auc < 0.88, auc
