"""Several MIL heads trained on the same bags, each in its own folder.

The MIL part shared by the image pipeline (:mod:`slamjax.pipeline`) and
features mode (:mod:`slamjax.features.pipeline`): ``config.mil.heads`` names
the heads to train, in order; every other ``config.mil`` key is shared by all
of them (head-specific keys live in their own sections: ``pamil``, ``asmil``,
``mecds``). Head ``h`` checkpoints and logs under ``workdir/mil_<h>``, so a
rerun resumes every head, and adding a head to the list trains only that one.
A non-parametric head (``negref``) is fitted by its own ``fit`` and saved as
``workdir/mil_<h>/<h>.npz``, which a rerun loads instead of refitting.

Example:
  >>> import numpy as np, ml_collections, tempfile
  >>> rng = np.random.default_rng(0)
  >>> bags = [rng.normal(size=(6, 4)).astype("float32") + y for y in (0, 1) * 4]
  >>> labels = np.array([0, 1] * 4)
  >>> cfg = ml_collections.ConfigDict(dict(heads=("abmil", "aem"), hidden_dim=8,
  ...     attention_dim=4, epochs=2, batch_size=4, checkpoint_every_epochs=100))
  >>> runs = fit_predict(cfg, bags, labels, {"test": bags[:3]}, tempfile.mkdtemp(),
  ...                    seed=0, verbose=False)
  >>> [(r.name, r.outputs["test"]["prob"].shape) for r in runs]
  [('abmil', (3, 1)), ('aem', (3, 1))]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from slamjax.mil import heads
from slamjax.mil import options
from slamjax.mil import standardize
from slamjax.mil import train as mil_train


def head_names(mil_cfg) -> tuple[str, ...]:
  """The heads of ``mil_cfg.heads``, checked: known, distinct, at least one.

  Entries may be comma-separated, so ``--config.mil.heads=abmil,asmil`` works
  on the command line (ml_collections reads it as one string).

  >>> head_names({"heads": ("abmil,asmil", "pamil")})
  ('abmil', 'asmil', 'pamil')
  """
  get = mil_cfg.get if hasattr(mil_cfg, "get") else dict(mil_cfg).get
  raw = get("heads")
  if isinstance(raw, str):
    raw = (raw,)
  names = tuple(n.strip() for entry in (raw or ()) for n in str(entry).split(",")
                if n.strip())
  if not names:
    raise ValueError(f"config.mil.heads={raw!r} names no head; valid: {sorted(heads.HEADS)}")
  unknown = [n for n in names if n not in heads.HEADS]
  if unknown:
    raise ValueError(f"config.mil.heads has unknown head(s) {unknown}; "
                     f"valid: {sorted(heads.HEADS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.mil.heads={names} lists a head twice")
  return names


def head_config(mil_cfg, name: str) -> ml_collections.ConfigDict:
  """The ``config.mil`` of one head, as :func:`slamjax.mil.train.fit` takes it:
  ``head=name``, every shared key, defaults for the rest.

  >>> c = head_config({"heads": ("abmil", "asmil"), "lr": 1e-3}, "asmil")
  >>> c.head, c.lr, "heads" in c
  ('asmil', 0.001, False)
  """
  over = mil_cfg.to_dict() if hasattr(mil_cfg, "to_dict") else dict(mil_cfg)
  over.pop("heads", None)
  return options.resolve(dict(over, head=name))


@dataclasses.dataclass
class HeadRun:
  """One trained head: its config, state (a :class:`slamjax.mil.train.MilState`,
  or a non-parametric head's dict of arrays), folder and predictions per split."""
  name: str
  cfg: ml_collections.ConfigDict
  state: Any
  workdir: str
  outputs: dict[str, dict]
  seconds: float


def fit_predict(mil_cfg, bags: Sequence, labels, predict_on: Mapping[str, Sequence],
                workdir: str, seed: int, verbose: bool = True) -> list[HeadRun]:
  """Trains (or resumes) every head of ``mil_cfg.heads`` on ``bags``/``labels``
  and predicts each split of ``predict_on`` (split -> bags).

  ``labels`` is [n] or [n, T] as :func:`slamjax.mil.train.fit` takes it. All
  heads get the same ``seed``. ``seconds`` is each head's wall time (training
  and prediction, compilation included).
  """
  runs = []
  for name in head_names(mil_cfg):
    cfg = head_config(mil_cfg, name)
    folder = os.path.join(workdir, f"mil_{name}")
    t0 = time.perf_counter()
    state = fit_head(cfg, bags, labels, folder, seed, verbose)
    outputs = {split: predict_head(cfg, state, b) for split, b in predict_on.items()}
    runs.append(HeadRun(name, cfg, state, folder, outputs, time.perf_counter() - t0))
  return runs


def fit_head(cfg, bags: Sequence, labels, folder: str, seed: int, verbose: bool = True):
  """Trains (or resumes) the head of ``cfg`` (one head's resolved config) in
  ``folder``: :func:`slamjax.mil.train.fit`, or a non-parametric head's fit,
  saved as ``folder/<head>.npz`` and loaded back on a rerun."""
  nonparametric = heads.get_spec(cfg).nonparametric
  if nonparametric is None:
    return mil_train.fit(cfg, bags, labels, folder, seed, verbose)
  return _fit_nonparametric(nonparametric[0], cfg.head, cfg, bags, labels, folder, seed,
                            verbose)


def predict_head(cfg, state, bags: Sequence) -> dict:
  """``prob`` and ``attention`` of a head :func:`fit_head` fitted."""
  nonparametric = heads.get_spec(cfg).nonparametric
  if nonparametric is None:
    return mil_train.predict(cfg, state, bags)
  return nonparametric[1](cfg, state, bags)


def is_nonparametric(cfg) -> bool:
  """Whether the head of ``cfg`` is fitted without gradients (no epochs)."""
  return heads.get_spec(cfg).nonparametric is not None


def fit_standardized(mil_cfg, bags: Sequence, labels, predict_on: Mapping[str, Sequence],
                     workdir: str, seed: int, verbose: bool = True) -> list[HeadRun]:
  """:func:`fit_predict` on bags z-scored with the training bags' statistics.

  The MIL step of the pipeline and the study: embeddings have an arbitrary
  scale, which otherwise saturates a head at initialisation, and only the
  training bags may set it (:mod:`slamjax.mil.standardize`).
  """
  mu, sd = standardize.fit(bags)
  return fit_predict(mil_cfg, standardize.apply(bags, mu, sd), labels,
                     {k: standardize.apply(v, mu, sd) for k, v in predict_on.items()},
                     workdir, seed, verbose)


def _fit_nonparametric(fit, name, cfg, bags, labels, folder, seed, verbose):
  """``fit``'s state, loaded from ``folder/<name>.npz`` when a run saved it."""
  path = os.path.join(folder, f"{name}.npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      return {key: z[key] for key in z.files}
  state = fit(cfg, bags, labels, seed)
  os.makedirs(folder, exist_ok=True)
  tmp = path + ".tmp"  # written whole, then renamed: a crash leaves no half file
  with open(tmp, "wb") as f:
    np.savez(f, **state)
  os.replace(tmp, path)
  if verbose:
    print(f"mil/{name}: fitted, saved {path}", flush=True)
  return state
