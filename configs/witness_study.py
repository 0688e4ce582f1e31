r"""The SLAM-AGS witness-rate study on real PBC cells (issue: reproduce the paper).

Pretraining methods x witness rates x seeds, each run the whole pipeline
(pretrain -> embed -> ABMIL and PAMIL), on the ``pbc_differential`` bags:
negative bags are a healthy white-cell differential, positive bags replace a
fraction of it with immature granulocytes and erythroblasts.

  python -m slamjax.main --config configs/witness_study.py --workdir /tmp/witness_study

Every finished run is recorded in ``docs/results/witness_study/runs/`` and the
tables and plots there are rebuilt after each run; rerunning the same command
skips recorded runs and resumes an interrupted one, so the study (about 6
hours on a 2-core CPU) is finished across sessions by running it again.
Quick variant (2 methods, 1 witness rate, tiny bags, results in the workdir):
``--config configs/witness_study.py:quick``. The paper-like variant, with
negative bags of lymphocytes only (``pbc_lymphocyte``; the 7 methods, no
ablations; results in ``docs/results/witness_study_lymphocyte/``):

  python -m slamjax.main --config configs/witness_study.py:lymphocyte --workdir /tmp/ws_lym

Choices, sized for ~6 h on this 2-core CPU (84 runs, ~4 min each):
- Bags of 200 cells, so that 0.5% means 1 witness (10% -> 20, 5% -> 10,
  1% -> 2). 12 negative + 12 positive bags per split; PBC has ~600
  lymphocytes per split, so cells recur across bags of a split
  (``reuse_cells``), never across splits.
- 48 px images (42 px crops) and a width-16 ResNet-18: at 64 px a run would
  cost ~1.8x more. 6 pretraining epochs (~230 steps of 128 cells).
- MIL dropout 0.5: with 24 training bags the heads otherwise fit noise
  (on simulated embeddings, test F1 0.69 -> 0.84 with dropout 0.5).
- Everything else as the reference: temperatures 0.07, equal task weights,
  projection-head embeddings, SGD momentum 0.9, weight decay 1e-4.
"""

import importlib.util
import os

import ml_collections


def _base_config(name, arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_slamjax_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  lymphocyte = arg == "lymphocyte"
  if arg not in (None, "", "quick", "lymphocyte"):
    raise ValueError("configs/witness_study.py takes no argument, 'quick' or "
                     f"'lymphocyte', got {arg!r}")
  # The paper-like variant: negative bags of lymphocytes only.
  base = "pbc_lymphocyte" if lymphocyte else "pbc_differential"
  c = _base_config(base, "quick" if quick else None)
  c.data.image_size = 32 if quick else 48
  c.bags.bag_size = 20 if quick else 200
  c.bags.reuse_cells = True
  c.bags.multi_label = False  # one bag label, as the paper
  c.bags.bags_per_split = {"train": (3, 3) if quick else (12, 12),
                           "test": (2, 2) if quick else (12, 12)}
  c.pretrain.epochs = 1 if quick else 6
  c.pretrain.warmup_epochs = 1
  c.pretrain.log_every_steps = 1 if quick else 5
  c.pretrain.checkpoint_every_steps = 2 if quick else 50
  c.mil.heads = ("abmil", "pamil")
  c.mil.dropout = 0.5  # 24 training bags: without it ABMIL memorises them
  c.mil.epochs = 2 if quick else 40
  c.eval.top_k = 2 if quick else 20  # 10% of a bag
  c.eval.num_plot_bags = 0 if quick else 2

  c.study = ml_collections.ConfigDict()
  c.study.witness_rates = (0.1,) if quick else (0.1, 0.05, 0.01, 0.005)
  c.study.methods = (("random_init", "slam_ags") if quick else
                     ("random_init", "simclr", "similarity", "weaksupcon", "pcgrad",
                      "slam_ags", "bag_label")
                     + (() if lymphocyte else  # ablations, added after the first 84 runs
                        ("slam_ags_lowsim", "slam_ags_backbone")))
  c.study.seeds = (0,) if quick else (0, 1, 2)
  # Relative to the current directory (run from the repository root); the
  # quick variant writes into the workdir instead (empty = workdir/results).
  c.study.results_dir = ("" if quick else "docs/results/witness_study_lymphocyte"
                         if lymphocyte else "docs/results/witness_study")
  return c
