"""Witness-rate bag simulation from any labelled pool of cells.

A pool is an integer class label per cell. Cells are first split between
train and test (stratified by class, from the seed), then bags are drawn
inside each split, so no cell is ever shared between splits. Negative bags
hold normal cells only; positive bags hold ``max(1, round(r * bag_size))``
witnesses (abnormal cells) and normal cells for the rest.

Example:
  >>> import numpy as np
  >>> labels = np.array([0] * 400 + [1] * 40)
  >>> plan = BagPlan(normal_classes=(0,), abnormal_classes=(1,),
  ...                witness_rate=0.1, bag_size=20,
  ...                bags_per_split={"train": (4, 4), "test": (2, 2)})
  >>> bags = make_bags(labels, plan, seed=0)
  >>> train = bags["train"]
  >>> train.num_bags, sorted(train.num_witnesses.tolist())
  (8, [0, 0, 0, 0, 2, 2, 2, 2])
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BagPlan:
  """How to turn a labelled pool into bags.

  Attributes:
    normal_classes: class labels that may fill any bag.
    abnormal_classes: class labels of witnesses (positive bags only).
    witness_rate: fraction r in (0, 1] of witnesses in a positive bag.
    bag_size: cells per bag (>= 1).
    bags_per_split: split name -> (num negative bags, num positive bags).
    split_fractions: split name -> fraction of each class's cells given to
      that split before bagging; defaults to equal shares.
    normal_proportions: optional mixing proportions of normal classes
      inside every bag (same order as ``normal_classes``), e.g. a white-cell
      differential. Default: draw uniformly from the pooled normal cells.
    reuse_cells: whether a cell may recur across bags of the same split
      (never across splits).
    witness_classes_per_bag: optional m in [1, len(abnormal_classes)]: each
      positive bag draws its witnesses from m abnormal classes picked at
      random (split as evenly as possible), so per-class (multi-task) bag
      labels differ between bags. Default None: witnesses are drawn from the
      pooled abnormal cells.
  """
  normal_classes: Sequence[int]
  abnormal_classes: Sequence[int]
  witness_rate: float
  bag_size: int
  bags_per_split: Mapping[str, tuple[int, int]]
  split_fractions: Mapping[str, float] | None = None
  normal_proportions: Sequence[float] | None = None
  reuse_cells: bool = False
  witness_classes_per_bag: int | None = None

  def num_witnesses(self) -> int:
    return max(1, int(round(self.witness_rate * self.bag_size)))

  def validate(self) -> None:
    if not 0.0 < self.witness_rate <= 1.0:
      raise ValueError(
          f"bags.witness_rate must be in (0, 1], got {self.witness_rate}")
    if self.bag_size < 1:
      raise ValueError(f"bags.bag_size must be >= 1, got {self.bag_size}")
    if not self.normal_classes or not self.abnormal_classes:
      raise ValueError("bags.normal_classes and bags.abnormal_classes must "
                       "both be non-empty")
    overlap = set(self.normal_classes) & set(self.abnormal_classes)
    if overlap:
      raise ValueError(f"classes {sorted(overlap)} are both normal and abnormal")
    for name, counts in self.bags_per_split.items():
      if len(counts) != 2 or min(counts) < 0 or sum(counts) < 1:
        raise ValueError(
            f"bags.bags_per_split[{name!r}] must be (num_negative >= 0, "
            f"num_positive >= 0) with at least one bag, got {counts}")
    if self.split_fractions is not None:
      if set(self.split_fractions) != set(self.bags_per_split):
        raise ValueError("bags.split_fractions must name the same splits as "
                         f"bags_per_split: {sorted(self.bags_per_split)}")
      if abs(sum(self.split_fractions.values()) - 1.0) > 1e-6 or min(
          self.split_fractions.values()) <= 0:
        raise ValueError("bags.split_fractions must be positive and sum to 1, "
                         f"got {dict(self.split_fractions)}")
    m = self.witness_classes_per_bag
    if m is not None and not 1 <= m <= len(self.abnormal_classes):
      raise ValueError("bags.witness_classes_per_bag must be in [1, "
                       f"{len(self.abnormal_classes)}] (the abnormal classes), got {m}")
    if self.normal_proportions is not None:
      p = np.asarray(self.normal_proportions, float)
      if p.shape != (len(self.normal_classes),) or (p < 0).any() or p.sum() <= 0:
        raise ValueError("bags.normal_proportions needs one non-negative "
                         "weight per normal class")


@dataclasses.dataclass(frozen=True)
class BagSet:
  """Bags of one split; every array is indexed by bag.

  Attributes:
    cells: per bag, int64 indices into the pool (shuffled within the bag).
    bag_labels: int32 [num_bags], 1 for positive bags.
    witness: per bag, bool flags marking abnormal cells.
    classes: per bag, the pool class label of every cell.
  """
  cells: list[np.ndarray]
  bag_labels: np.ndarray
  witness: list[np.ndarray]
  classes: list[np.ndarray]

  @property
  def num_bags(self) -> int:
    return len(self.cells)

  @property
  def num_witnesses(self) -> np.ndarray:
    return np.array([w.sum() for w in self.witness], dtype=np.int64)

  @property
  def witness_rates(self) -> np.ndarray:
    return np.array([w.mean() for w in self.witness])

  def all_cells(self, label: int | None = None) -> np.ndarray:
    """Pool indices of the cells in all bags (optionally one bag label)."""
    parts = [c for c, y in zip(self.cells, self.bag_labels)
             if label is None or y == label]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)

  def summary(self) -> dict:
    return {"num_bags": self.num_bags,
            "num_positive": int(self.bag_labels.sum()),
            "num_cells": int(sum(len(c) for c in self.cells)),
            "witnesses_per_positive_bag": self.num_witnesses[
                self.bag_labels == 1].tolist(),
            "realised_witness_rate": [
                float(r) for r in self.witness_rates[self.bag_labels == 1]]}


def split_pool(labels: np.ndarray, fractions: Mapping[str, float],
               seed: int) -> dict[str, np.ndarray]:
  """Stratified split of pool indices; every cell lands in exactly one split."""
  rng = np.random.default_rng([seed, 1])
  names = list(fractions)
  out = {n: [] for n in names}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cuts = np.round(np.cumsum([fractions[n] for n in names]) * len(idx)).astype(int)
    for n, part in zip(names, np.split(idx, cuts[:-1])):
      out[n].append(part)
  return {n: np.sort(np.concatenate(v)) for n, v in out.items()}


def _normal_counts(plan: BagPlan, n: int) -> np.ndarray:
  """Splits n normal cells over normal classes (largest remainder)."""
  p = np.asarray(plan.normal_proportions, float)
  raw = p / p.sum() * n
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return counts


def _required(plan: BagPlan, split: str) -> dict[str, int]:
  """Number of distinct cells a split needs, per pool ('normal'/class/'abnormal')."""
  neg, pos = plan.bags_per_split[split]
  k = plan.num_witnesses() if pos else 0
  need = {"abnormal": pos * k}
  fill = neg * plan.bag_size + pos * (plan.bag_size - k)
  if plan.normal_proportions is None:
    need["normal"] = fill
  else:
    per_bag_neg = _normal_counts(plan, plan.bag_size)
    per_bag_pos = _normal_counts(plan, plan.bag_size - k)
    for c, a, b in zip(plan.normal_classes, per_bag_neg, per_bag_pos):
      need[f"class {c}"] = int(neg * a + pos * b)
  return need


class _Drawer:
  """Draws cells from a pool, without replacement unless reuse is allowed."""

  def __init__(self, pool: np.ndarray, rng, reuse: bool, name: str, split: str):
    self.pool, self.rng, self.reuse = pool, rng, reuse
    self.order = rng.permutation(pool)
    self.pos, self.name, self.split = 0, name, split

  def take(self, n: int) -> np.ndarray:
    if n == 0:
      return np.zeros((0,), np.int64)
    if self.reuse:
      if len(self.pool) < n:
        raise ValueError(f"split {self.split!r}: a bag needs {n} {self.name} "
                         f"cells, only {len(self.pool)} available")
      return self.rng.choice(self.pool, n, replace=False)
    out = self.order[self.pos:self.pos + n]
    self.pos += n
    return out


def make_bags(labels: np.ndarray, plan: BagPlan, seed: int) -> dict[str, BagSet]:
  """Splits the pool, then draws each split's bags. Deterministic in seed.

  Raises:
    ValueError: before drawing anything if the plan is invalid or needs more
      cells than a split holds; the message gives needed and available counts.
  """
  plan.validate()
  labels = np.asarray(labels)
  fractions = plan.split_fractions or {
      s: 1.0 / len(plan.bags_per_split) for s in plan.bags_per_split}
  splits = split_pool(labels, fractions, seed)

  pools = {}
  for split, idx in splits.items():
    sl = labels[idx]
    p = {"abnormal": idx[np.isin(sl, plan.abnormal_classes)],
         "normal": idx[np.isin(sl, plan.normal_classes)]}
    for c in plan.normal_classes:
      p[f"class {c}"] = idx[sl == c]
    if plan.witness_classes_per_bag is not None:
      for c in plan.abnormal_classes:
        p[f"abnormal {c}"] = idx[sl == c]
    pools[split] = p
    if not plan.reuse_cells:
      for what, n in _required(plan, split).items():
        if n > len(p[what]):
          raise ValueError(
              f"Bag plan needs {n} {what} cells in split {split!r} but only "
              f"{len(p[what])} are available (bag_size={plan.bag_size}, "
              f"witness_rate={plan.witness_rate}, bags_per_split"
              f"[{split!r}]={tuple(plan.bags_per_split[split])}). Use fewer or "
              "smaller bags, or allow reuse_cells.")

  out = {}
  k = plan.num_witnesses()
  for s_i, split in enumerate(plan.bags_per_split):
    rng = np.random.default_rng([seed, 2, s_i])
    p = pools[split]
    drawers = {name: _Drawer(pool, rng, plan.reuse_cells, name, split)
               for name, pool in p.items()}
    neg, pos = plan.bags_per_split[split]
    cells, bag_labels = [], []
    for y in [0] * neg + [1] * pos:
      n_wit = k if y else 0
      if plan.normal_proportions is None:
        normal = drawers["normal"].take(plan.bag_size - n_wit)
      else:
        counts = _normal_counts(plan, plan.bag_size - n_wit)
        normal = np.concatenate([drawers[f"class {c}"].take(n) for c, n in
                                 zip(plan.normal_classes, counts)])
      if plan.witness_classes_per_bag is None or not n_wit:
        witnesses = drawers["abnormal"].take(n_wit)
      else:
        chosen = rng.choice(len(plan.abnormal_classes), plan.witness_classes_per_bag,
                            replace=False)
        sizes = [len(a) for a in np.array_split(np.arange(n_wit), len(chosen))]
        witnesses = np.concatenate([
            drawers[f"abnormal {plan.abnormal_classes[c]}"].take(n)
            for c, n in zip(chosen, sizes)])
        if len(witnesses) < n_wit:
          raise ValueError(
              f"split {split!r}: not enough cells of the abnormal classes "
              f"{[plan.abnormal_classes[c] for c in chosen]} for "
              f"witness_classes_per_bag={plan.witness_classes_per_bag}; use fewer "
              "or smaller bags, or allow reuse_cells.")
      bag = np.concatenate([normal, witnesses])
      cells.append(rng.permutation(bag).astype(np.int64))
      bag_labels.append(y)
    order = rng.permutation(len(cells))  # interleave negatives and positives
    cells = [cells[i] for i in order]
    classes = [labels[c] for c in cells]
    out[split] = BagSet(
        cells=cells,
        bag_labels=np.asarray(bag_labels, np.int32)[order],
        witness=[np.isin(c, plan.abnormal_classes) for c in classes],
        classes=classes)
  return out
