"""Heads are selectable from config.mil.heads; config keys match the defaults;
multi-task labels and metrics from simulated bags."""

import importlib.util
import os

import numpy as np
import pytest

from slamjax import evaluate
from slamjax.data import bags as bags_lib
from slamjax.mil import diagnostics, heads, labels, multihead, options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _default_config():
  spec = importlib.util.spec_from_file_location(
      "default_config", os.path.join(ROOT, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_every_head_selectable_from_default_config():
  cfg = _default_config()
  assert multihead.head_names(cfg.mil) == ("abmil",)
  for section in ("pamil", "asmil", "mecds", "topk", "negref"):
    assert set(cfg.mil[section].to_dict()) == set(options.DEFAULTS[section]), section
  built = {}
  for name in heads.HEADS:
    head_cfg = multihead.head_config(cfg.mil, name)
    assert set(head_cfg.to_dict()) == set(options.DEFAULTS) and head_cfg.head == name
    spec = heads.get_spec(head_cfg)
    if spec.nonparametric is not None:  # no module: fitted by multihead.fit_predict
      with pytest.raises(ValueError, match="non-parametric"):
        spec.build(head_cfg, 2, None)
      built[name] = None
      continue
    built[name] = type(spec.build(head_cfg, 2, None)).__name__
  assert built == {"abmil": "GatedABMIL", "aem": "GatedABMIL", "pamil": "PAMIL",
                   "pamil_official": "PAMIL", "asmil": "ASMIL", "mecds": "MECDS",
                   "topk": "TopKMIL", "negref": None}
  assert heads.aem_weight(options.resolve(dict(head="aem"))) == 0.1
  with pytest.raises(ValueError, match="valid"):
    heads.get_spec(options.resolve(dict(head="nope")))


@pytest.mark.parametrize("heads_value,match", [
    (("abmil", "nope"), r"config.mil.heads has unknown head\(s\) \['nope'\]"),
    ((), r"config.mil.heads=\(\) names no head"),
    (("abmil,abmil",), r"lists a head twice"),
])
def test_bad_heads_name_the_field(heads_value, match):
  with pytest.raises(ValueError, match=match):
    multihead.head_names({"heads": heads_value})


def test_multi_labels_and_metrics():
  pool = np.array([0] * 400 + [1] * 40 + [2] * 40)
  plan = bags_lib.BagPlan(normal_classes=(0,), abnormal_classes=(1, 2), witness_rate=0.2,
                          bag_size=10, bags_per_split={"train": (4, 6)})
  bs = bags_lib.make_bags(pool, plan, seed=0)["train"]
  y = labels.multi_labels(bs, (1, 2))
  wit = labels.multi_witness(bs, (1, 2))
  assert y.shape == (10, 2) and (y.max(1) == bs.bag_labels).all()
  for yi, wi, w in zip(y, wit, bs.witness):
    assert wi.shape == (2, len(w)) and (wi.any(1) == yi.astype(bool)).all()
    assert (wi.any(0) == w).all()
  probs = np.clip(y + 0.1, 0, 0.9)
  m = evaluate.multitask_bag_metrics(y, probs, ["c1", "c2"])
  assert m["macro"]["f1"] == 1.0 and set(m["per_task"]) == {"c1", "c2"}
  # cell scores: the witnesses of each task rank first
  att = [w.astype(float) + 0.01 for w in wit]
  r = evaluate.multitask_retrieval(att, wit, y, k=2)
  assert r["task_0"]["average_precision"] == 1.0 and r["task_1"]["average_precision"] == 1.0
  assert diagnostics.attention_jsd([np.ones(4)], [np.ones(4)]) == 0.0


def test_single_class_witness_bags():
  pool = np.array([0] * 600 + [1] * 60 + [2] * 60)
  plan = bags_lib.BagPlan(normal_classes=(0,), abnormal_classes=(1, 2), witness_rate=0.2,
                          bag_size=10, bags_per_split={"train": (5, 20)},
                          witness_classes_per_bag=1)
  y = labels.multi_labels(bags_lib.make_bags(pool, plan, seed=0)["train"], (1, 2))
  assert (y.sum(1) <= 1).all() and (y.sum(0) > 0).all()


def test_pamil_official_freezes_kmeans_prototypes():
  cfg = options.resolve(dict(head="pamil_official", hidden_dim=8, attention_dim=4,
                             pamil=dict(num_protos=3)))
  spec = heads.get_spec(cfg)
  rng = np.random.default_rng(0)
  bags = [rng.normal(size=(12, 5)).astype(np.float32) for _ in range(4)]
  protos = np.asarray(spec.init_params(cfg, {"params": {"proto": np.zeros((3, 5))}},
                                       bags, 0)["params"]["proto"])
  assert protos.shape == (3, 5) and np.isfinite(protos).all() and protos.std() > 0
  tree = {"params": {"proto": 0, "fc": {"kernel": 0}, "cls_b": 0}}
  assert heads.path_labels(tree, spec.frozen(cfg)) == {
      "params": {"proto": "frozen", "fc": {"kernel": "train"}, "cls_b": "train"}}
  slam = options.resolve(dict(head="pamil"))
  assert heads.get_spec(slam).frozen(slam) is None
