"""Settings for every test, in-process and in the subprocesses tests start.

Set through the environment before JAX is imported, so that subprocesses
(``python -m slamjax.main`` in the end-to-end tests) inherit them:

* XLA without most optimisations: ResNet-sized programs compile several
  times faster on 2 cores; the tests check numbers, not speed.
* A persistent compilation cache, shared by pytest-xdist workers and
  subprocesses: a program compiled once (the same step in every fold or
  rerun) is read back instead of compiled again.
"""

import os
import tempfile

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "slamjax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # and its oneDNN banner
