"""Checks a config before any work starts: keys, names and ranges.

Every key must exist in the base config (:mod:`slamjax.config.base`); every
name (runner, data source, surgery method, MIL head, objective) must be in
its registry; numbers must be in range. Errors name the field, the value and
what would be valid, and come before any data is loaded.

Each list of valid names lives with the code that implements it
(``pretrain.OBJECTIVES``, ``heads.HEADS``, ``baselines.NAMES``, ...); this
module only reads them. :func:`prepare` is the one setup every runner gets:
called by ``python -m slamjax.main`` once, or by a runner called as a library.

Example:
  >>> from slamjax import config, validation
  >>> cfg = config.load("default", "quick")
  >>> cfg.bags.witness_rate = 1.5
  >>> validation.validate(cfg)
  Traceback (most recent call last):
  ...
  ValueError: config.bags.witness_rate=1.5 is outside the valid range (0, 1]
"""

from __future__ import annotations

import difflib

import ml_collections

from slamjax import embed
from slamjax import pretrain
from slamjax import runners
from slamjax import surgery
from slamjax import workdir as workdir_lib
from slamjax.config import base as base_lib
from slamjax.config.values import IMPLIED_SOURCE
from slamjax.config.values import data_source
from slamjax.config.values import names
from slamjax.config.values import parse_shard
from slamjax.data import augment
from slamjax.data import slide_table
from slamjax.data import sources
from slamjax.mil import multihead
from slamjax.models import resnet
from slamjax.slides import baselines
from slamjax.slides import slide_features

# Fields whose value is a free-form mapping (class -> count, split -> counts).
FREE_FORM = {"data.num_per_class", "bags.bags_per_split", "bags.split_fractions",
             "pretrain.surgery_kwargs"}


def _unknown_keys(node, ref, prefix: str) -> None:
  for key in node.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      close = difflib.get_close_matches(key, list(ref.keys()), n=1)
      hint = f"; did you mean config.{prefix}{close[0]}?" if close else ""
      raise ValueError(f"Unknown config key config.{path}{hint} Valid keys of "
                       f"config.{prefix[:-1] or ''}: {sorted(ref.keys())}".replace(
                           "config.:", "config:"))
    sub, ref_sub = node[key], ref[key]
    if path not in FREE_FORM and isinstance(ref_sub, ml_collections.ConfigDict):
      if not isinstance(sub, ml_collections.ConfigDict):
        raise ValueError(f"config.{path} must be a section (ConfigDict), got {sub!r}")
      _unknown_keys(sub, ref_sub, path + ".")


def _range(path, value, lo, hi, lo_open=False, hi_open=False, integer=False):
  bad = (integer and int(value) != value) or value < lo or value > hi or (
      lo_open and value == lo) or (hi_open and value == hi)
  if bad:
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    kind = "an integer in " if integer else ""
    where = (f"is outside the valid range {kind}{lb}{lo}, {hi}{rb}" if hi != float("inf")
             else f"must be {'more than' if lo_open else 'at least'} {lo}"
             + " (an integer)" * integer)  # not "the range [2, inf]"
    raise ValueError(f"config.{path}={value!r} {where}")


def _choice(path, value, valid) -> None:
  if value not in valid:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config.{path}={value!r} is not valid{hint}; valid: {sorted(valid)}")


def _names(cfg) -> None:
  """Every name the config uses, checked against its registry."""
  _choice("runner", cfg.runner, runners.RUNNERS)
  implied = IMPLIED_SOURCE.get(cfg.runner)
  _choice("data.source", data_source(cfg),
          (implied,) if implied else tuple(sources.SOURCES))
  _choice("pretrain.surgery", cfg.pretrain.surgery, surgery.names())
  _choice("pretrain.surgery_granularity", cfg.pretrain.surgery_granularity,
          pretrain.GRANULARITIES)
  _choice("pretrain.objective", cfg.pretrain.objective, pretrain.OBJECTIVES)
  _choice("embed.output", cfg.embed.output, embed.OUTPUTS)
  _choice("model.projection", cfg.model.projection, resnet.PROJECTIONS)
  _choice("pretrain.similarity", cfg.pretrain.similarity, pretrain.SIMILARITIES)
  _choice("data.unlisted", cfg.data.unlisted, slide_table.UNLISTED)
  _choice("resume", cfg.resume, workdir_lib.Run.MODES)
  multihead.head_names(cfg.mil)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError on unknown keys, unknown names or out-of-range values."""
  _unknown_keys(cfg, base_lib.get_config(), "")
  _names(cfg)
  inf = float("inf")
  b = cfg.bags
  _range("bags.witness_rate", b.witness_rate, 0, 1, lo_open=True)
  _range("bags.bag_size", b.bag_size, 1, inf, integer=True)
  for split, counts in b.bags_per_split.items():
    if len(counts) != 2 or min(counts) < 0:
      raise ValueError(f"config.bags.bags_per_split.{split}={counts} must be "
                       "(num_negative >= 0, num_positive >= 0)")
  p = cfg.pretrain
  _range("pretrain.epochs", p.epochs, 0, inf, integer=True)
  _range("pretrain.batch_size", p.batch_size, 2, inf, integer=True)
  _range("pretrain.lr", p.lr, 0, inf)
  _range("pretrain.temperature", p.temperature, 0, inf, lo_open=True)
  _range("pretrain.warmup_epochs", p.warmup_epochs, 0, inf, integer=True)
  _range("pretrain.checkpoint_every_steps", p.checkpoint_every_steps, 1, inf, integer=True)
  _range("pretrain.log_every_steps", p.log_every_steps, 1, inf, integer=True)
  if len(p.task_weights) != 2:
    raise ValueError(f"config.pretrain.task_weights={tuple(p.task_weights)} needs two "
                     "weights: (SimCLR, similarity)")
  a = cfg.augment
  _range("augment.crop_size", a.crop_size, 8, cfg.data.image_size, integer=True)
  _range("augment.jitter_prob", a.jitter_prob, 0, 1)
  _range("augment.rot90_prob", a.rot90_prob, 0, 1)
  _range("model.width", cfg.model.width, 1, inf, integer=True)
  _range("mil.epochs", cfg.mil.epochs, 1, inf, integer=True)
  _range("mil.batch_size", cfg.mil.batch_size, 1, inf, integer=True)
  _range("eval.top_k", cfg.eval.top_k, 1, inf, integer=True)
  _range("eval.folds", cfg.eval.folds, 1, inf, integer=True)
  _range("data.test_fraction", cfg.data.test_fraction, 0, 1, lo_open=True, hi_open=True)
  parse_shard(cfg.study.shard)
  _range("data.center_crop", cfg.data.center_crop, 0, 1, lo_open=True)
  _range("eval.inner_folds", cfg.eval.inner_folds, 2, inf, integer=True)
  _choice("augment.policy", cfg.augment.policy, augment.POLICIES)
  for name in names(cfg.mil.slide_features):
    _choice("mil.slide_features", name, slide_features.FEATURES)
  ps = cfg.pseudo
  _range("pseudo.rounds", ps.rounds, 0, inf, integer=True)
  if ps.rounds:
    _range("pseudo.steps_per_round", ps.steps_per_round, 1, inf, integer=True)
    _range("pseudo.positive_share", ps.positive_share, 0, 1, lo_open=True, hi_open=True)
    _range("pseudo.lr", ps.lr, 0, inf, lo_open=True)
    _range("pseudo.checkpoint_every_steps", ps.checkpoint_every_steps, 1, inf, integer=True)
    if not len(ps.per_bag):
      raise ValueError("config.pseudo.per_bag is empty; give the pseudo-positive cells "
                       "per positive bag for each round, e.g. (1,) or (1, 2, 4)")
    for n in ps.per_bag:
      _range("pseudo.per_bag", n, 1, inf, integer=True)
    if cfg.runner == "features":
      raise ValueError(f"config.pseudo.rounds={ps.rounds}: the features runner has no "
                       "encoder to fine-tune; set pseudo.rounds=0")
    if cfg.runner == "slides" and cfg.eval.unlabeled_in_pretraining:
      raise ValueError("config.pseudo.rounds > 0 with eval.unlabeled_in_pretraining: "
                       "unlabeled slides would be taken for positive ones; turn one off")
  if cfg.runner == "slides":
    _range("eval.folds", cfg.eval.folds, 2, inf, integer=True)
  if cfg.runner != "slides" and names(cfg.eval.baselines):
    # Only the slides runner runs them; elsewhere they would be ignored.
    raise ValueError(
        f"config.eval.baselines={names(cfg.eval.baselines)} is read by the slides runner "
        f"only (config.runner={cfg.runner!r}); the witness-rate study compares encoders "
        "on simulated bags (configs/witness_study.py, study.methods)")
  if cfg.runner == "slides" and "pseudo_label" in names(cfg.eval.baselines) and \
      cfg.eval.unlabeled_in_pretraining:
    raise ValueError("config.eval.baselines 'pseudo_label' with "
                     "eval.unlabeled_in_pretraining: unlabeled slides would be taken for "
                     "positive ones; turn one off")
  for name in names(cfg.eval.baselines):
    _choice("eval.baselines", name, baselines.NAMES)
  if cfg.runner == "slides":
    baselines.check(cfg, names(cfg.eval.baselines))
