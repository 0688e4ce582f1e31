"""Validates a config before any work starts, naming the field and valid range.

Example:
  >>> from configs import default
  >>> cfg = default.get_config("quick")
  >>> cfg.bags.witness_rate = 1.5
  >>> validate(cfg)
  Traceback (most recent call last):
  ...
  ValueError: config.bags.witness_rate=1.5 is outside the valid range (0, 1]
"""

from __future__ import annotations

import ml_collections

# Allowed keys per section. A key not listed here is a typo or a leftover and
# is rejected, so a silently ignored setting cannot change an experiment.
SCHEMA = {
    "": {"seed", "data", "bags", "augment", "model", "pretrain", "embed", "mil",
         "eval", "mesh", "distributed"},
    "data": {"source", "image_size", "num_per_class", "stain_std", "root", "manifest",
             "dedup", "skip_bad_files", "num_workers", "classes", "max_per_class"},
    "bags": {"normal_classes", "abnormal_classes", "normal_proportions",
             "witness_rate", "bag_size", "bags_per_split", "split_fractions",
             "reuse_cells", "multi_label", "witness_classes_per_bag"},
    "augment": {"crop_size", "flip", "jitter_strength", "jitter_prob",
                "rot90_prob", "mean", "std"},
    "model": {"name", "width", "proj_dims", "impl", "head_norm"},
    "pretrain": {"surgery", "surgery_kwargs", "surgery_granularity", "epochs", "batch_size", "lr",
                 "momentum", "weight_decay", "warmup_epochs", "temperature",
                 "base_temperature", "checkpoint_every_steps", "log_every_steps",
                 "task_weights", "objective"},
    "embed": {"batch_size", "output"},
    "mil": None,  # head-specific keys; validated by the head registry
    "eval": {"top_k", "num_plot_bags", "linear_probe", "export_features"},
    "mesh": {"data"},
    "distributed": None,
}


def _range(cfg, path, value, lo, hi, lo_open=False, hi_open=False, integer=False):
  bad = (integer and int(value) != value) or value < lo or value > hi or (
      lo_open and value == lo) or (hi_open and value == hi)
  if bad:
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    kind = "an integer in " if integer else ""
    raise ValueError(f"config.{path}={value!r} is outside the valid range "
                     f"{kind}{lb}{lo}, {hi}{rb}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError on unknown keys or out-of-range values."""
  for section, allowed in SCHEMA.items():
    if allowed is None:
      continue
    node = cfg if not section else cfg.get(section)
    if node is None:
      if section in ("distributed",):
        continue
      raise ValueError(f"config.{section} is missing")
    unknown = sorted(set(node.keys()) - allowed)
    if unknown:
      prefix = f"config.{section}." if section else "config."
      raise ValueError(f"Unknown config key(s) {[prefix + k for k in unknown]}; "
                       f"valid keys: {sorted(allowed)}")
  b = cfg.bags
  _range(cfg, "bags.witness_rate", b.witness_rate, 0, 1, lo_open=True)
  _range(cfg, "bags.bag_size", b.bag_size, 1, float("inf"), integer=True)
  for split, counts in b.bags_per_split.items():
    if len(counts) != 2 or min(counts) < 0:
      raise ValueError(f"config.bags.bags_per_split.{split}={counts} must be "
                       "(num_negative >= 0, num_positive >= 0)")
  p = cfg.pretrain
  _range(cfg, "pretrain.epochs", p.epochs, 0, float("inf"), integer=True)
  _range(cfg, "pretrain.batch_size", p.batch_size, 2, float("inf"), integer=True)
  _range(cfg, "pretrain.lr", p.lr, 0, float("inf"))
  _range(cfg, "pretrain.temperature", p.temperature, 0, float("inf"), lo_open=True)
  _range(cfg, "pretrain.warmup_epochs", p.warmup_epochs, 0, float("inf"), integer=True)
  _range(cfg, "pretrain.checkpoint_every_steps", p.checkpoint_every_steps, 1,
         float("inf"), integer=True)
  a = cfg.augment
  _range(cfg, "augment.crop_size", a.crop_size, 8, cfg.data.image_size, integer=True)
  _range(cfg, "augment.jitter_prob", a.jitter_prob, 0, 1)
  _range(cfg, "augment.rot90_prob", a.rot90_prob, 0, 1)
  _range(cfg, "model.width", cfg.model.width, 1, float("inf"), integer=True)
  _range(cfg, "mil.epochs", cfg.mil.epochs, 1, float("inf"), integer=True)
  _range(cfg, "mil.batch_size", cfg.mil.batch_size, 1, float("inf"), integer=True)
  _range(cfg, "eval.top_k", cfg.eval.top_k, 1, float("inf"), integer=True)
