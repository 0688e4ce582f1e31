"""Helpers for tests that start ``jax.distributed`` processes on localhost."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(**extra) -> dict:
  """This environment without SLAMJAX_*/device settings, CPU, fast compiles."""
  out = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLAMJAX_", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES"))}
  # Compiling the train step dominates these tests; without XLA:CPU's fusion
  # emitters it takes about a third less CPU time (same numbers either way).
  out.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_cpu_use_fusion_emitters=false",
             PYTHONPATH=ROOT + os.pathsep + out.get("PYTHONPATH", ""), **extra)
  return out


def process_env(port: int, pid: int, nproc: int = 2) -> dict:
  """The variables that make a process join a localhost ``nproc``-process run."""
  return dict(JAX_NUM_CPU_DEVICES="1", SLAMJAX_COORDINATOR=f"localhost:{port}",
              SLAMJAX_NUM_PROCESSES=str(nproc), SLAMJAX_PROCESS_ID=str(pid))


def start(args, **extra_env) -> subprocess.Popen:
  """Starts ``python ARGS`` in the repository root, output captured."""
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(**extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def communicate(procs, timeout: float = 900) -> list[str]:
  """Waits for every process; fails (killing the rest) on error or timeout."""
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("worker timed out")
    logs.append(out)
    if p.returncode != 0:
      for q in procs:
        q.kill()
      pytest.fail(f"process {len(logs) - 1} exited with {p.returncode}:\n{out[-4000:]}")
  return logs
