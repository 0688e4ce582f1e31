"""The setup every runner shares, done once per command before its work
starts: the config checked, the inputs found, the device mesh built.
Process-wide settings (:func:`slamjax.runtime.setup`) stay with the entry
points, so a runner called from a notebook leaves its process as it was.

``python -m slamjax.main`` calls :func:`prepare` and hands the mesh to the
runner; a runner called as a library (``pipeline.train_and_evaluate(cfg,
workdir)``) calls it itself, so both paths get the same checks once.

Example:
  >>> from slamjax import config, launch
  >>> mesh = launch.prepare(config.load("default", "quick"), "/tmp/slamjax_doc")
  >>> mesh.axis_names
  ('data',)
"""

from __future__ import annotations

import os

from slamjax import runtime
from slamjax import sharding
from slamjax import validation
from slamjax.models import pretrained


def prepare(cfg, workdir: str):
  """Checks ``cfg`` and its inputs and returns the device mesh of
  ``config.mesh``; creates nothing on disk and changes no process setting.

  Raises:
    runtime.InputError: a bad config, a missing ``data.root``, or a
      ``workdir`` that is a file; one line naming the field or path.
    pretrained.InitFromError: a ``model.init_from`` that is missing, not a
      checkpoint, or of another architecture.
  """
  try:
    validation.validate(cfg)  # before any data is loaded
  except ValueError as e:
    raise runtime.InputError(f"bad config: {runtime.one_line(e)}") from e
  runtime.check_data_root(cfg)  # before the runner makes the workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise runtime.InputError(f"--workdir={workdir} is a file; give a folder (it is "
                             "created if missing)")
  pretrained.check(cfg)  # a bad model.init_from fails before any data is decoded
  return sharding.make_mesh(cfg.mesh.data)
