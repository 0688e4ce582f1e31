r"""SLAM-AGS end to end on the built-in synthetic cytology data.

Pretrains a ResNet-18 (narrow, for CPU) with SLAM-AGS, extracts embeddings
of every cell in every bag, trains a gated-attention ABMIL head and reports
bag F1/AUC and attention retrieval of witnesses at a 10% witness rate.

  python -m slamjax.main --config configs/default.py --workdir /tmp/slamjax

Overrides: ``--config.bags.witness_rate=0.05 --config.pretrain.epochs=5``.
Quick variant for tests and smoke runs: ``--config configs/default.py:quick``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  if arg not in (None, "", "quick"):
    raise ValueError(f"configs/default.py takes no argument or 'quick', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Cell pool: the built-in generator (slamjax/data/synthetic.py).
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.image_size = 40
  c.data.stain_std = 0.06  # per-crop stain colour variation
  c.data.num_per_class = {"normal": 300 if quick else 11500,
                          "blast": 60 if quick else 600}

  # Bags: cells are split train/test first, then bagged per split.
  c.bags = ml_collections.ConfigDict()
  c.bags.normal_classes = ("normal",)
  c.bags.abnormal_classes = ("blast",)
  c.bags.normal_proportions = None
  c.bags.witness_rate = 0.1
  c.bags.bag_size = 20 if quick else 50
  # 120 training bags: with 40 the MIL head memorised them (train F1 1.0,
  # test AUC ~0.6 on simulated embeddings); 80 test bags make the reported
  # F1 less noisy.
  c.bags.bags_per_split = {"train": (3, 3) if quick else (60, 60),
                           "test": (3, 3) if quick else (40, 40)}
  c.bags.split_fractions = None if quick else {"train": 0.6, "test": 0.4}
  c.bags.reuse_cells = False
  # One binary label per abnormal class ("holds a cell of class c"): heads
  # train on all of them and results add per-task rows.
  c.bags.multi_label = False
  # Witnesses of a positive bag from this many random abnormal classes
  # (None: from all of them pooled); 1 makes the per-class labels differ.
  c.bags.witness_classes_per_bag = ml_collections.config_dict.placeholder(int)

  # On-device augmentations, as in the reference (crop, flip, jitter, rot90).
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_size = 32
  c.augment.flip = True
  c.augment.jitter_strength = 0.1  # brightness/contrast/saturation/hue
  c.augment.jitter_prob = 0.8
  c.augment.rot90_prob = 0.8
  c.augment.mean = (0.5, 0.5, 0.5)
  c.augment.std = (0.25, 0.25, 0.25)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"
  c.model.width = 8 if quick else 16
  c.model.proj_dims = (64, 64) if quick else (512, 512)
  c.model.impl = "auto"
  c.model.head_norm = False

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.surgery = "adaptive_pcgrad"  # any slamjax.surgery.get() name
  c.pretrain.surgery_granularity = "model"  # or "leaf": one surgery per tensor
  # Loss weights of (SimCLR, similarity); (1, 0) / (0, 1) give the
  # single-task baselines.
  # The similarity loss has no repulsion; at weight 1 it collapses the
  # projection within ~15 steps (NT-Xent stuck at log(2B-1) = 4.84) and
  # surgery cannot undo it, so it is weighted 0.1 here (the reference: 1.0).
  c.pretrain.task_weights = (1.0, 0.1)
  # "slam", or "bag_label": the weakly supervised baseline (cells inherit
  # their bag label; needs model.proj_dims ending in 1, embed.output="backbone").
  c.pretrain.objective = "slam"
  c.pretrain.epochs = 2 if quick else 15
  c.pretrain.batch_size = 32 if quick else 128
  c.pretrain.lr = 0.05
  c.pretrain.momentum = 0.9
  c.pretrain.weight_decay = 1e-4
  c.pretrain.warmup_epochs = 1 if quick else 2
  c.pretrain.temperature = 0.07
  c.pretrain.base_temperature = 0.07
  c.pretrain.checkpoint_every_steps = 10 if quick else 50
  c.pretrain.log_every_steps = 5 if quick else 20

  c.embed = ml_collections.ConfigDict()
  c.embed.batch_size = 256
  c.embed.output = "projection"  # or "backbone" (pooled ResNet features)

  c.mil = ml_collections.ConfigDict()
  # Heads trained on the same embeddings, one results row each (folder
  # mil_<head>): abmil | aem | pamil | pamil_official | asmil | mecds
  # (slamjax/mil/heads.py). Command line: --config.mil.heads=abmil,asmil
  c.mil.heads = ("abmil",)
  c.mil.hidden_dim = 128
  c.mil.attention_dim = 64
  c.mil.dropout = 0.5  # few training bags: without it ABMIL memorises them
  c.mil.epochs = 10 if quick else 60
  c.mil.batch_size = 4 if quick else 8
  c.mil.lr = 5e-4
  c.mil.weight_decay = 1e-4
  c.mil.checkpoint_every_epochs = 10
  # Defaults and meaning of the keys below: slamjax/mil/options.py.
  c.mil.optimizer = "adam"  # L2 before Adam (torch Adam) | "adamw"
  c.mil.grad_clip = 0.0  # global-norm clip; 0 = off
  c.mil.schedule = "constant"  # | "cosine"
  c.mil.min_len = 16  # smallest padding bucket
  c.mil.buckets_per_octave = 4  # bag lengths padded to 16, 20, 24, 28, 32, 40, ...
  c.mil.aem_weight = 0.0  # AEM regulariser on any head (head "aem": 0.1)
  c.mil.aem_top_k = 0
  c.mil.aem_schedule = "constant"
  c.mil.stability_bags = 8  # attention JSD between epochs on these bags
  placeholder = ml_collections.config_dict.placeholder
  c.mil.pamil = ml_collections.ConfigDict(dict(
      variant="slamags", num_protos=10, proto_pred=True, proto_weight=0.5,
      er_weight=placeholder(float), clst_weight=placeholder(float),
      proto_clst_weight=placeholder(float), inst_weight=0.0, k_sample=8,
      proto_init=placeholder(str), freeze_protos=placeholder(bool)))
  c.mil.asmil = ml_collections.ConfigDict(dict(
      n_token=16, n_drop=10, num_heads=8, dropout=0.1, temperature=0.5,
      kd_weight=1.0, kd_reduction="kl_per_row", anchor="ema", anchor_decay=0.999))
  c.mil.mecds = ml_collections.ConfigDict(dict(
      num_layers=2, num_heads=8, top_p=0.5, instance_attention="full",
      kd_weight=1.0, akd_temperature=2.0, gamma_pos=1.0, gamma_neg=4.0, alpha=0.2,
      teacher_epochs=placeholder(int), student_init="teacher"))

  c.eval = ml_collections.ConfigDict()
  c.eval.top_k = 10
  c.eval.num_plot_bags = 4
  c.eval.export_features = False  # write embeddings/attention for other MIL tools

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # size of the data-parallel axis; -1 = all devices
  return c
