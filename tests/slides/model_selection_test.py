"""Honest model selection: thresholds and epochs from inner out-of-fold predictions."""

import os

import ml_collections
import numpy as np
import pytest

from slamjax import config as config_lib
from slamjax import validation
from slamjax.data import slides as slides_lib
from slamjax.slides import model_selection as ms


def test_threshold_sits_between_the_classes_it_separates():
  y = np.array([0, 0, 1, 1])
  assert ms.choose_threshold(y, np.array([.1, .3, .35, .9])) == pytest.approx(0.325)
  assert ms.choose_threshold(np.array([1, 1]), np.array([.2, .9])) == 0.5


def test_logreg_threshold_comes_from_out_of_fold_probabilities():
  rng = np.random.default_rng(0)
  y = np.array([0] * 40 + [1] * 20)  # 2:1, as real cohorts
  x = np.stack([y + rng.normal(0, 0.7, 60), rng.normal(size=60)], 1)
  folds = ms.inner_folds(y[:, None], None, 5, seed=0)
  fit = ms.fit_logreg(x, y, folds)
  assert np.isfinite(fit.oof).all()
  assert fit.threshold == ms.choose_threshold(y, fit.oof)
  assert abs(fit.coef[0]) > 5 * abs(fit.coef[1])  # the informative feature wins
  again = ms.LogReg.from_json(fit.to_json())
  np.testing.assert_allclose(again.predict(x), fit.predict(x))


def test_inner_folds_too_small_names_the_fold_and_the_key():
  y = np.array([[0.], [0.], [0.], [1.]])
  with pytest.raises(slides_lib.CohortError, match=r"fold3.*inner_folds"):
    ms.inner_folds(y, None, 2, seed=0, where="fold3")


def _bags(n, rng, signal):
  """Bags of 12 cells; positives hold 3 cells shifted along dim 0."""
  y = np.array([i % 3 == 0 for i in range(n)], np.float32)  # 1:2
  bags = []
  for yi in y:
    b = rng.normal(size=(12, 4)).astype(np.float32)
    if yi:
      b[:3, 0] += signal
    bags.append(b)
  return bags, y[:, None]


def _cfg(tmp_features=()):
  cfg = config_lib.load("slides", "quick")
  cfg.mil.epochs = 8
  cfg.mil.lr = 5e-3
  cfg.eval.inner_folds = 3
  cfg.mil.slide_features = tmp_features
  return cfg


def test_fit_heads_thresholds_from_inner_cv_and_resume(tmp_path):
  rng = np.random.default_rng(0)
  bags, y = _bags(30, rng, 3.0)
  cfg = _cfg()
  fits = ms.fit_heads(cfg, bags, y, None, str(tmp_path), verbose=False)
  (f,) = fits
  assert f.epochs in ms.epoch_candidates(cfg.mil) and f.epochs == min(
      f.inner_bce, key=lambda e: (round(f.inner_bce[e], 6), e))
  # The threshold is Youden's J on the inner out-of-fold probabilities.
  assert f.thresholds[0] == ms.choose_threshold(y[:, 0], f.oof_prob[:, 0])
  test, y_test = _bags(30, np.random.default_rng(1), 3.0)
  p = ms.predict_head(f.cfg, f.state, test, None, None)["prob"][:, 0]
  from sklearn.metrics import roc_auc_score
  assert roc_auc_score(y_test[:, 0], p) > 0.9
  inner = [os.path.join(tmp_path, "inner", str(k), "mil_abmil", "oof.npz") for k in range(3)]
  assert all(os.path.exists(p) for p in inner)
  # A rerun reads the recorded inner folds back: identical choices.
  again = ms.fit_heads(cfg, bags, y, None, str(tmp_path), verbose=False)[0]
  assert again.epochs == f.epochs and again.thresholds == f.thresholds


def test_fusion_uses_slide_features_the_bags_hide(tmp_path):
  rng = np.random.default_rng(0)
  bags, y = _bags(36, rng, 0.0)  # nothing in the cells
  feats = (y + rng.normal(0, 0.3, y.shape)).astype(np.float32)  # the slide-level signal
  cfg = _cfg(("log_count",))
  (f,) = ms.fit_heads(cfg, bags, y, None, str(tmp_path), feats, verbose=False)
  assert f.fusion is not None and abs(f.fusion[0].meta.coef[1]) > abs(f.fusion[0].meta.coef[0])
  test, y_test = _bags(36, np.random.default_rng(1), 0.0)
  feats_test = (y_test + np.random.default_rng(2).normal(0, 0.3, y_test.shape)).astype(
      np.float32)
  out = ms.predict_head(f.cfg, f.state, test, feats_test, f.fusion)
  from sklearn.metrics import roc_auc_score
  assert roc_auc_score(y_test[:, 0], out["prob"][:, 0]) > 0.9
  assert roc_auc_score(y_test[:, 0], out["mil_prob"][:, 0]) < 0.8


def test_degenerate_threshold():
  assert ms.degenerate(0.95, np.array([.2, .5, .9]))
  assert not ms.degenerate(0.5, np.array([.2, .5, .9]))


def test_epoch_candidates_only_where_snapshots_equal_shorter_runs():
  c = ml_collections.ConfigDict(dict(epochs=40, schedule="constant", aem_schedule="constant"))
  assert ms.epoch_candidates(c) == (5, 10, 20, 30, 40)
  c.schedule = "cosine"
  assert ms.epoch_candidates(c) == (40,)


def test_stacking_reduces_a_wide_block_to_one_score():
  rng = np.random.default_rng(0)
  y = np.array([0, 0, 1] * 20)
  head = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.0, 60))))
  wide = rng.normal(size=(60, 40))  # noise, 40 columns
  wide[:, 0] += y  # one weak signal column
  count = (y + rng.normal(0, 1.0, 60))[:, None]
  feats = np.concatenate([count, wide], 1)
  folds = ms.inner_folds(y[:, None], None, 5, seed=0)
  fu = ms.fit_fusion(head, feats, [1, 40], y, folds)
  assert fu.meta.coef.shape == (3,)  # head logit, count, the wide block's score
  assert fu.blocks[0][2] is None and fu.blocks[1][2].coef.shape == (40,)
  again = ms.Fusion.from_json(fu.to_json())
  np.testing.assert_allclose(again.predict(head, feats), fu.predict(head, feats))
  assert fu.meta.threshold == ms.choose_threshold(y, fu.meta.oof)


def test_nonparametric_negref_head_in_the_slides_selection(tmp_path):
  # One witness-like cell per positive bag, in a direction no negative takes.
  rng = np.random.default_rng(0)
  bags, y = _bags(30, rng, 4.0)
  cfg = _cfg()
  cfg.mil.heads = ("negref",)
  validation.validate(cfg)  # the slides runner takes it
  (f,) = ms.fit_heads(cfg, bags, y, None, str(tmp_path), verbose=False)
  assert ms.epoch_candidates(f.cfg) == (cfg.mil.epochs,)  # nothing to choose
  assert f.thresholds[0] == ms.choose_threshold(y[:, 0], f.oof_prob[:, 0])
  assert os.path.exists(os.path.join(tmp_path, "mil_negref", "negref.npz"))
  test, y_test = _bags(30, np.random.default_rng(1), 4.0)
  p = ms.predict_head(f.cfg, f.state, test, None, None)["prob"][:, 0]
  from sklearn.metrics import roc_auc_score
  assert roc_auc_score(y_test[:, 0], p) > 0.9
  info = {"heads": ["negref"], "task_names": ["label"], "epochs": {"negref": f.epochs}}
  ((name, c, st, fusion),) = ms.load_fitted(cfg, str(tmp_path), info, test)
  np.testing.assert_allclose(ms.predict_head(c, st, test, None, fusion)["prob"][:, 0], p)
