r"""The SLAM-AGS variants study on real PBC cells (issue 18).

Pretraining methods x witness rates x seeds on lymphocyte-only negative bags
(``pbc_lymphocyte``, as the paper's LYT bags); positive bags replace a
fraction of the lymphocytes with immature granulocytes and erythroblasts.
Every run is the whole pipeline (pretrain -> embed -> ABMIL) plus
encoder-only measures on held-out cells (``slamjax/study/encoder_eval.py``).

  nice -n 10 python -m slamjax.main --config configs/witness_study.py --workdir /tmp/slam_variants

Every finished run is recorded in ``docs/results/slam_variants/runs/`` and the
tables and plots there are rebuilt after each run; rerunning the same command
skips recorded runs and resumes an interrupted one (from its pretraining and
MIL checkpoints), so the study is finished across sessions by running it
again. One process keeps about one core of a 2-core machine busy; two
processes, with ``--config.study.shard=0/2`` and ``--config.study.shard=1/2``
and the same workdir, share the runs between them. Quick variant (PBC
subset, tiny bags, 2 methods; results in the workdir; the tests use it):
``--config configs/witness_study.py:quick``.

Design (issue 18, item 2), sized for about 6 hours on this 2-core CPU:
- 10 methods (``slamjax/study/methods.py``): random init, SimCLR, the
  published SLAM-AGS (1:1, shared head, adaptive PCGrad), WeakSupCon,
  PCGrad, and the variants per-task heads, repel, variance floor, low-sim
  weight 0.1 and leaf surgery; witness rates 10, 5, 1, 0.5%; seeds 0, 1, 2.
- Bags of 200 cells (0.5% = 1 witness), 100 negative + 100 positive bags per
  split. PBC has ~607 lymphocytes per split, so cells recur across the bags
  of a split (``reuse_cells``), never across splits.
- Pretraining: one pass over the training bags' cells (312 steps of 128
  cells, ~60 visits per distinct lymphocyte), no warm-up, lr 0.05, 48 px
  images (42 px crops), width-16 ResNet-18, projection (512, 512).
- One MIL head (ABMIL, dropout 0.25, 25 epochs) on the features the method
  reads (``embed.output``) and again on the other features.
- Encoder-only: linear-probe and kNN (k=20, cosine) AUC, witness vs normal,
  fit on 600 + 600 train-split cells, scored on 600 + 600 held-out test-split
  cells, on backbone and projection features.

Variant ``slide_labels`` (issue 27): the methods that use the slide labels
beyond SLAM-AGS (top-k MIL, negative-reference scoring, pseudo-label
SupCon), each on a SimCLR encoder, against SimCLR at 1, 0.5 and 0.2%
(bags of 500 at 0.2%, so that a positive bag holds one witness). Its
study copies this study's SimCLR records at 1% and 0.5% (``study.reuse_from``,
checked to be the same configuration), so only the new rows are computed:

  python -m slamjax.main --config configs/witness_study.py:slide_labels --workdir /tmp/slide_labels
"""

import ml_collections

from slamjax import config as config_lib

METHODS = ("random_init", "simclr", "slam_ags", "weaksupcon", "pcgrad",
           "per_task", "repel", "variance", "lowsim", "leaf")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  if arg not in (None, "", "quick", "slide_labels"):
    raise ValueError("configs/witness_study.py takes no argument, 'quick' or "
                     f"'slide_labels', got {arg!r}")
  c = config_lib.load("pbc_lymphocyte", "quick" if quick else None)
  c.runner = "study"
  c.data.image_size = 32 if quick else 48
  c.augment.crop_size = 28 if quick else 42
  c.bags.bag_size = 20 if quick else 200
  c.bags.reuse_cells = True
  c.bags.multi_label = False  # one bag label, as the paper
  c.bags.bags_per_split = {"train": (4, 4) if quick else (100, 100),
                           "test": (4, 4) if quick else (100, 100)}
  c.model.projection = "shared"  # the published recipe; per_task is a variant
  c.pretrain.epochs = 1
  c.pretrain.warmup_epochs = 0  # one pass over the cells of 200 bags: 312 steps
  c.pretrain.log_every_steps = 1 if quick else 5
  c.pretrain.checkpoint_every_steps = 5 if quick else 50
  c.mil.heads = ("abmil",)
  c.mil.dropout = 0.25
  c.mil.epochs = 2 if quick else 25
  c.mil.batch_size = 4 if quick else 8
  c.eval.top_k = 2 if quick else 20  # 10% of a bag
  c.eval.num_plot_bags = 0
  c.eval.linear_probe = False  # replaced by the study's encoder measures

  s = c.study
  s.witness_rates = (0.1,) if quick else (0.1, 0.05, 0.01, 0.005)
  s.methods = ("random_init", "slam_ags") if quick else METHODS
  s.seeds = (0,) if quick else (0, 1, 2)
  s.probe_cells_per_class = 40 if quick else 600
  s.knn_k = 5 if quick else 20
  s.bootstrap = 200 if quick else 1000
  # Relative to the current directory (run from the repository root); the
  # quick variant writes into the workdir instead ("" = workdir/results).
  s.results_dir = "" if quick else "docs/results/slam_variants"
  if arg == "slide_labels":
    s.methods = ("simclr", "topk", "negref", "its2clr")
    s.witness_rates = (0.01, 0.005, 0.002)
    s.results_dir = "docs/results/slide_label_methods"
    s.reuse_from = "docs/results/slam_variants"
  return c
