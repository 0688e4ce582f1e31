"""The study's pretraining methods (config overrides) and its run plan.

Each method is a set of overrides on the study's base config. Every run is
one (method, witness rate, seed); :func:`run_configs` yields them seed-major,
so a study stopped early still has every cell of the table once per
finished seed.

Example:
  >>> from slamjax.study import methods
  >>> methods.run_id("slam_ags", 0.005, 2)
  'seed2/wr0.005/slam_ags'
  >>> methods.METHODS["per_task"].overrides["model"]
  {'projection': 'per_task'}
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterator

import ml_collections


@dataclasses.dataclass(frozen=True)
class Method:
  label: str  # short name for tables and legends
  description: str
  overrides: dict  # section -> {key: value}
  variant: bool = False  # a variant of issue 18 (not a method of the paper)


_SLAM = {"task_weights": (1.0, 1.0), "surgery": "adaptive_pcgrad"}
_SIMCLR = {"task_weights": (1.0, 0.0), "surgery": "sum"}

METHODS: dict[str, Method] = {
    "random_init": Method("random init", "no pretraining (randomly initialised encoder)",
                          {"pretrain": {"epochs": 0}}),
    "simclr": Method("SimCLR", "SimCLR only, on positive-bag cells",
                     {"pretrain": dict(_SIMCLR)}),
    "slam_ags": Method(
        "SLAM-AGS (published)",
        "SimCLR + similarity 1:1, shared projection head, adaptive PCGrad",
        {"pretrain": dict(_SLAM)}),
    "weaksupcon": Method("WeakSupCon", "SimCLR + similarity 1:1, gradients summed",
                         {"pretrain": {"task_weights": (1.0, 1.0), "surgery": "sum"}}),
    "pcgrad": Method("PCGrad", "SimCLR + similarity 1:1 with PCGrad",
                     {"pretrain": {"task_weights": (1.0, 1.0), "surgery": "pcgrad"}}),
    # Variants of issue 18 (each differs from slam_ags in one setting).
    "per_task": Method(
        "per-task heads", "SLAM-AGS with one projection head per task "
        "(surgery acts on the shared backbone)",
        {"pretrain": dict(_SLAM), "model": {"projection": "per_task"}}, True),
    "repel": Method(
        "repel", "SLAM-AGS with a similarity loss that also repels "
        "positive-bag cells", {"pretrain": {**_SLAM, "similarity": "repel"}}, True),
    "variance": Method(
        "variance floor", "SLAM-AGS plus a VICReg-style hinge on the per-dimension "
        "std of the projection", {"pretrain": {**_SLAM, "variance_weight": 1.0}}, True),
    "lowsim": Method(
        "low-sim 0.1", "SLAM-AGS with the similarity loss weighted 0.1",
        {"pretrain": {"task_weights": (1.0, 0.1), "surgery": "adaptive_pcgrad"}}, True),
    "leaf": Method(
        "leaf surgery", "SLAM-AGS with adaptive PCGrad per parameter tensor",
        {"pretrain": {**_SLAM, "surgery_granularity": "leaf"}}, True),
    # Issue 27: methods that use the slide labels beyond SLAM-AGS, each on a
    # SimCLR encoder (one setting for every witness rate).
    "topk": Method(
        "top-k MIL", "SimCLR encoder; top-k MIL cell classifier (Campanella 2019, k=1)",
        {"pretrain": dict(_SIMCLR), "mil": {"heads": ("topk",)}}),
    "negref": Method(
        "negative reference", "SimCLR encoder; cells scored by a k-NN density ratio "
        "(positive-bag vs negative-bag cells), bag score = the highest-scored cell",
        {"pretrain": dict(_SIMCLR), "mil": {"heads": ("negref",)}}),
    "its2clr": Method(
        "pseudo-label SupCon", "SimCLR, then 3 rounds of pseudo-label supervised "
        "contrastive fine-tuning (negative-reference pseudo-labels, ItS2CLR-style); ABMIL",
        {"pretrain": dict(_SIMCLR), "pseudo": {"rounds": 3}}),
    # Not in the main study (kept for configs that ask for it).
    "bag_label": Method(
        "bag label", "weakly supervised: cells trained on their bag's label",
        {"pretrain": {"objective": "bag_label", "surgery": "sum"},
         "model": {"proj_dims": (512, 1)}, "embed": {"output": "backbone"}}),
}


def apply(cfg: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets ``cfg.<section>.<key>`` for every override; unknown keys raise."""
  for section, values in overrides.items():
    for key, value in values.items():
      if section not in cfg or key not in cfg[section]:
        raise KeyError(f"method override config.{section}.{key} is not a config key "
                       "(is this checkout older than the method?)")
      cfg[section][key] = value


def run_id(method: str, witness_rate: float, seed: int) -> str:
  return f"seed{seed}/wr{witness_rate:g}/{method}"


def parse_run_id(rid: str) -> tuple[int, float, str]:
  seed, wr, method = rid.split("/")
  return int(seed[4:]), float(wr[2:]), method


def bag_size(base: int, witness_rate: float) -> int:
  """``base``, or more where a positive bag of ``base`` cells would hold
  less than one witness, so that every witness rate is realised (1 in 500
  at 0.2%).

  >>> bag_size(200, 0.005), bag_size(200, 0.002)
  (200, 500)
  """
  return max(int(base), int(round(1.0 / witness_rate)))


def run_configs(cfg) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """(run id, pipeline config) of every run, in execution order.

  Seed-major order: after each seed the table has every cell once, so a
  study stopped early still gives a complete (if thinner) comparison.
  """
  from slamjax import config as config_lib
  s = cfg.study
  names = config_lib.names(s.methods)  # "a,b" from the command line too
  for name in names:
    if name not in METHODS:
      raise ValueError(f"config.study.methods: unknown method {name!r}; "
                       f"valid: {sorted(METHODS)}")
  base = copy.deepcopy(cfg)
  base.runner = "pipeline"  # each run is one pipeline run (study section unused)
  for seed in s.seeds:
    for wr in s.witness_rates:
      for name in names:
        c = copy.deepcopy(base)
        apply(c, METHODS[name].overrides)
        c.seed = int(seed)
        c.bags.witness_rate = float(wr)
        c.bags.bag_size = bag_size(base.bags.bag_size, wr)
        yield run_id(name, wr, seed), c
