r"""The base config: every key slamjax reads, with its default. One source of truth.

Every config in ``configs/`` starts from :func:`get_config` and overrides
what it needs; :func:`slamjax.validation.validate` rejects any key that is not
here, so a misspelled or stale setting can never be silently ignored.
A config copied out of ``configs/`` still works: it imports this module from
the installed package, not a sibling file.

Example:
  >>> from slamjax.config import base
  >>> c = base.get_config()
  >>> c.runner, c.pretrain.surgery, c.mil.heads
  ('pipeline', 'adaptive_pcgrad', ('abmil',))
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A workdir that holds results of another run (config or data differ):
  # "auto" stops and names the differences; "overwrite" deletes its results
  # and starts afresh. The same run resumes either way (slamjax/workdir.py).
  c.resume = "auto"
  # What main runs (slamjax.runners.RUNNERS): pipeline | features | study | slides
  c.runner = "pipeline"

  c.data = ml_collections.ConfigDict()
  # Cell source (slamjax.data.sources.SOURCES): synthetic | folder | features | slides
  c.data.source = "synthetic"
  c.data.image_size = 40
  # source=synthetic: the built-in generator (slamjax/data/synthetic.py).
  c.data.stain_std = 0.06  # per-crop stain colour variation
  c.data.num_per_class = {"normal": 11500, "blast": 600}
  # source=folder|features|slides: where the data is.
  c.data.root = ""
  # source=folder: one sub-folder per class (slamjax/data/folder.py).
  c.data.classes = placeholder(tuple)  # class folders to load (None: all)
  c.data.manifest = placeholder(str)  # folder: CSV (label, file); features: slide CSV
  c.data.dedup = False  # drop byte-identical files, keeping the first
  c.data.max_per_class = placeholder(int)  # a seeded random subset per class
  c.data.skip_bad_files = False  # skip undecodable files (counted in the report)
  c.data.num_workers = 0  # decode threads; 0 = CPU count
  # source=features|slides: slide tables.
  c.data.label_columns = ()  # () = every column but slide_id/patient_id/split/fold
  c.data.unlisted = "error"  # or "ignore": files/folders missing from the CSV
  c.data.test_fraction = 0.3  # features: used when the CSV has no split column
  c.data.standardize = True  # features: z-score with training-slide statistics
  # source=slides: root/<slide_id>/**/<images> + a slide CSV (slamjax/data/slides.py).
  c.data.csv = "slides.csv"  # relative to root, or absolute
  c.data.cells_csv = ""  # optional cell table slide_id,path[,witness]
  c.data.label_column = ""  # one categorical column instead of 0/1 columns
  c.data.negative_label = ""  # its normal value; every other value is a task
  c.data.cache_dir = ""  # decoded-cell cache; "" = $SLAMJAX_CACHE or ~/.cache/slamjax
  # Fraction of the square crop kept (centred) before resizing to image_size;
  # cell crops are usually centred with wide margins (docs/slides.md).
  c.data.center_crop = 1.0

  # Simulated bags (pipeline runner): cells split train/test, then bagged.
  c.bags = ml_collections.ConfigDict()
  c.bags.normal_classes = ("normal",)
  c.bags.abnormal_classes = ("blast",)
  c.bags.normal_proportions = placeholder(tuple)
  c.bags.witness_rate = 0.1
  c.bags.bag_size = 50
  c.bags.bags_per_split = {"train": (60, 60), "test": (40, 40)}
  c.bags.split_fractions = placeholder(dict)  # None: what the bag plan needs
  c.bags.reuse_cells = False
  # One binary label per abnormal class ("holds a cell of class c").
  c.bags.multi_label = False
  # Witnesses of a positive bag from this many random abnormal classes.
  c.bags.witness_classes_per_bag = placeholder(int)

  # On-device augmentations, as in the reference (crop, flip, jitter, rot90).
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_size = 32
  c.augment.flip = True
  c.augment.jitter_strength = 0.1  # brightness/contrast/saturation/hue
  c.augment.jitter_prob = 0.8
  c.augment.rot90_prob = 0.8
  # "reference": the knobs above as given. "cytology": rotations and flips
  # (cells have no orientation), translation-only crops (cell size is
  # diagnostic), brightness/contrast jitter at jitter_strength, no hue or
  # saturation jitter (stain colour is diagnostic). slamjax/data/augment.py.
  c.augment.policy = "reference"
  # Per-view per-channel gain in [1 - s, 1 + s] (stain differs between
  # slides) and Gaussian blur of sigma in [0, blur_sigma] px (focus differs).
  c.augment.stain_jitter = 0.0
  c.augment.blur_sigma = 0.0
  c.augment.mean = (0.5, 0.5, 0.5)
  c.augment.std = (0.25, 0.25, 0.25)

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"
  c.model.width = 16
  c.model.proj_dims = (512, 512)
  c.model.impl = "auto"
  c.model.head_norm = False
  # "per_task" (default): a SimCLR head and a similarity head on the shared
  # backbone; embed.output="projection" reads the SimCLR head. "shared": one
  # head for both tasks, as the reference; at equal weights its similarity
  # loss collapses that head (docs/results/slam_variants).
  c.model.projection = "per_task"
  # Initial encoder weights from a local file: a torchvision ResNet-18
  # state_dict (.pth/.pt), .safetensors or .npz (slamjax/models/pretrained.py).
  c.model.init_from = ""

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.surgery = "adaptive_pcgrad"  # any slamjax.surgery.get() name
  c.pretrain.surgery_kwargs = ml_collections.ConfigDict()  # e.g. {"alpha": 0.5}
  c.pretrain.surgery_granularity = "model"  # or "leaf": one surgery per tensor
  # Loss weights of (SimCLR, similarity); (1, 0) / (0, 1) give the
  # single-task baselines. The reference uses (1, 1).
  c.pretrain.task_weights = (1.0, 1.0)
  # "slam", or "bag_label": the weakly supervised baseline (cells inherit
  # their bag label; needs model.proj_dims ending in 1, embed.output="backbone").
  c.pretrain.objective = "slam"
  c.pretrain.epochs = 15
  c.pretrain.batch_size = 128
  c.pretrain.lr = 0.05
  c.pretrain.momentum = 0.9
  c.pretrain.weight_decay = 1e-4
  c.pretrain.warmup_epochs = 2
  c.pretrain.temperature = 0.07
  c.pretrain.base_temperature = 0.07
  # The similarity task on negative-bag cells: "attract" (the reference:
  # pulls them together, no repulsion) or "repel" (SupCon-style: they also
  # repel the batch's positive-bag cells, whose backbone features come from
  # the SimCLR forward, detached).
  c.pretrain.similarity = "attract"
  # VICReg-style variance floor added to the similarity task: weight *
  # mean over dims of relu(target - std), on the negative-bag cells'
  # normalised projections scaled by sqrt(D) (1 = spread of a uniform sphere).
  # The similarity loss is scaled by 1/base_temperature (~14), so weights
  # near 1 are too weak to matter; VICReg's own is 25.
  c.pretrain.variance_weight = 0.0
  c.pretrain.variance_target = 1.0
  # Collapse detector (slamjax/collapse.py): a logged step counts as
  # collapsed when embed_std < collapse_spread, or when NT-Xent is within
  # collapse_margin of log(2B-1), its value at uniform similarity; a run,
  # when collapse_patience consecutive logged steps do (warned on the console,
  # summarised in workdir/pretrain_collapse.json).
  c.pretrain.collapse_spread = 0.05
  c.pretrain.collapse_margin = 0.05
  c.pretrain.collapse_patience = 3
  c.pretrain.checkpoint_every_steps = 50
  c.pretrain.log_every_steps = 20  # each line: the mean over these steps

  # Pseudo-label contrastive stage after pretraining (ItS2CLR-style,
  # slamjax/pseudo_label.py); rounds=0 = off. Each round scores the training
  # cells as head negref does (mil.negref), labels the per_bag[r] top
  # cells of every positive bag positive, and fine-tunes the encoder
  # with a supervised-contrastive loss whose only class that pulls together
  # is the pseudo-positives (every other cell keeps SimCLR's own-view pair).
  c.pseudo = ml_collections.ConfigDict()
  c.pseudo.rounds = 0
  c.pseudo.steps_per_round = 100
  # Per round (the last repeats). One: a positive bag is only known to hold
  # at least one witness, whatever the witness rate.
  c.pseudo.per_bag = (1,)
  c.pseudo.positive_share = 0.25  # of each batch: pseudo-positive cells
  c.pseudo.lr = 0.01
  c.pseudo.checkpoint_every_steps = 50

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
  c.mil.dropout = 0.0
  c.mil.epochs = 60
  c.mil.batch_size = 8
  c.mil.lr = 5e-4
  c.mil.weight_decay = 1e-4
  c.mil.checkpoint_every_epochs = 10
  c.mil.optimizer = "adam"  # L2 added before Adam (torch Adam) | "adamw"
  c.mil.grad_clip = 0.0  # global-norm clip; 0 = off (ASMIL/DTFD use 5)
  c.mil.schedule = "constant"  # or "cosine" (per step, to 0; the ACMIL family)
  c.mil.min_len = 16  # smallest padding bucket
  c.mil.buckets_per_octave = 4  # bag lengths padded to 16, 20, 24, 28, 32, 40, ...
  c.mil.aem_weight = 0.0  # AEM lambda for any head; head "aem" uses 0.1 if 0
  c.mil.aem_top_k = 0  # 0 = full entropy; k > 0 = the top-k variant
  c.mil.aem_schedule = "constant"  # or "cosine" decay to 0
  # Weight the BCE of each task by class so both classes count equally
  # (real cohorts are often 2:1 or worse).
  c.mil.class_balance = False
  # Slide-level inputs that attention pooling cannot see, fused with the
  # head's output by a regularised logistic regression fitted on inner-CV
  # predictions (slides runner): "log_count", "pixel_stats".
  c.mil.slide_features = ()
  c.mil.stability_bags = 8  # training bags whose attention JSD is tracked per epoch
  # Head-specific sections; None means "the variant's / head's default".
  c.mil.pamil = ml_collections.ConfigDict(dict(
      variant="slamags",  # or "official"
      num_protos=10,
      proto_pred=True,  # prototype branch (needed for the ER loss)
      proto_weight=0.5,
      er_weight=placeholder(float),  # None: variant default (0.1 / 0.5)
      clst_weight=placeholder(float),  # (0.005 / 0.5)
      proto_clst_weight=placeholder(float),  # (0.005 / 0.2)
      inst_weight=0.0,  # CLAM-style instance loss (0.5 in the references)
      k_sample=8,
      proto_init=placeholder(str),  # "random" | "kmeans"
      freeze_protos=placeholder(bool)))  # None: official frozen, slamags trainable
  c.mil.asmil = ml_collections.ConfigDict(dict(
      n_token=16, n_drop=10, num_heads=8, dropout=0.1,
      temperature=0.5,  # NSF tau of the anchor attention
      kd_weight=1.0,
      kd_reduction="kl_per_row",  # or "reference_mean"
      anchor="ema",  # or "frozen_random" (the released code)
      anchor_decay=0.999))
  # Top-k MIL (Campanella et al. 2019): a cell classifier whose bag logit is
  # the mean of its k highest cell logits; k=1 is the paper's max rule.
  c.mil.topk = ml_collections.ConfigDict(dict(k=1))
  # Negative-reference scoring (non-parametric, slamjax/mil/negref.py): a
  # cell's score is its mean cosine similarity to its k nearest positive-bag
  # cells minus that to its k nearest negative-bag cells ("ratio", a k-NN
  # density ratio) or 1 minus the latter ("novelty"); the bag score is its
  # largest cell score, calibrated by a logistic regression on the training bags.
  c.mil.negref = ml_collections.ConfigDict(dict(k=10, bank_size=16384, score="ratio"))
  c.mil.mecds = ml_collections.ConfigDict(dict(
      num_layers=2, num_heads=8, top_p=0.5,
      instance_attention="full",  # or "none" (no N x N; for huge bags)
      kd_weight=1.0,  # lambda of the AKD term (student phase)
      akd_temperature=2.0, gamma_pos=1.0, gamma_neg=4.0, alpha=0.2,
      teacher_epochs=placeholder(int),  # None: same as epochs
      student_init="teacher"))  # or "fresh" (see slamjax/mil/mecds.py)

  c.eval = ml_collections.ConfigDict()
  c.eval.top_k = 10  # attention retrieval cut-off
  c.eval.num_plot_bags = 4  # attention galleries
  c.eval.linear_probe = True  # cell-level logistic probes (needs cell labels)
  c.eval.export_features = False  # write embeddings/attention for other MIL tools
  c.eval.export_attention = True  # features/slides: attention CSV per slide
  # slides runner: cross-validation and the final model.
  c.eval.folds = 5  # patient-grouped stratified folds (a CSV split/fold column wins)
  # Inner folds on the training slides: out-of-fold predictions choose the
  # thresholds and the MIL epoch count, never the fitted head's own.
  c.eval.inner_folds = 5
  # Also run the folds with these (slamjax/slides/baselines.py): encoders
  # "simclr", "random_init", "pretrained" (frozen model.init_from weights),
  # "pseudo_label" (the run's encoder + 3 rounds of pseudo.* fine-tuning);
  # non-deep "pixel_stats", "cell_count"; "mean_pool" (encoder embeddings
  # mean-pooled into a logistic regression).
  c.eval.baselines = ()
  c.eval.final_model = True  # train on every labelled slide, for slamjax.predict
  c.eval.unlabeled_in_pretraining = False  # unlabeled slides join the NT-Xent task

  # The witness-rate study (study runner): methods x witness rates x seeds.
  c.study = ml_collections.ConfigDict()
  c.study.witness_rates = (0.1, 0.05, 0.01, 0.005)
  c.study.methods = ("random_init", "slam_ags")
  c.study.seeds = (0, 1, 2)
  c.study.results_dir = ""  # "" = workdir/results
  # "i/n": this process runs every n-th run of the study (run k if k % n == i),
  # so that n processes on one machine share the work ("" = all runs).
  c.study.shard = ""
  # Encoder-only measures (slamjax/study/encoder_eval.py): linear-probe and
  # kNN AUC, witness vs normal, on held-out cells, backbone and projection.
  c.study.encoder_eval = True
  c.study.probe_cells_per_class = 600  # normal and witness-class cells per split
  c.study.knn_k = 20
  c.study.other_features = True  # also train the MIL heads on the other features
  c.study.bootstrap = 1000  # resamples of test bags for the tables' 95% CIs
  # Another study's results folder whose records of this study's runs are
  # copied instead of recomputed, when its study_config.json matches this
  # config outside the study section ("" = none).
  c.study.reuse_from = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # size of the data-parallel axis; -1 = all devices
  return c
