"""What the console and the galleries tell a user of the slides runner:
overall progress with an ETA, a one-line collapse warning for smoke runs,
gallery rows with the call, probability and threshold, and negative slides
next to positive ones."""

import types

import matplotlib.figure
import numpy as np

from slamjax import collapse
from slamjax import progress
from slamjax import report
from slamjax.slides import report as slides_report


def test_run_progress_counts_folds_and_estimates_from_run_ones(capsys):
  times = iter([0.0, 0.0, 0.0, 300.0, 400.0, 700.0, 1000.0, 1500.0])
  p = progress.RunProgress(5, final=True, clock=lambda: next(times))
  p.skip()  # fold 1 was recorded by an earlier run: no time of its own
  p.start("slam_ags fold1: 8 training, 8 held-out slides")
  p.start("slam_ags fold2")
  p.skip()
  p.start("simclr fold0")
  p.start_final("training on all 16 labelled slides")
  p.done()
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines == [
      "slides: fold 2 of 5 (slam_ags fold1: 8 training, 8 held-out slides); elapsed "
      "0m00s, ETA after this fold",
      "slides: fold 3 of 5 (slam_ags fold2); elapsed 5m00s, ETA 20m00s (with the final "
      "model)",
      # fold 3 took 100 s: mean (300 + 100) / 2 = 200 s, 2 units left
      "slides: fold 5 of 5 (simclr fold0); elapsed 11m40s, ETA 6m40s (with the final model)",
      # fold 4 took 300 s: mean 233 s for the one unit left
      "slides: final model (training on all 16 labelled slides); elapsed 16m40s, ETA 3m53s",
  ]
  assert p._times == [300.0, 100.0, 300.0, 500.0]  # the final model's ends at done()


def test_compact_collapse_warning_is_one_line(capsys):
  history = [{"embed_std": 0.01, "loss_simclr": 3.4}] * 3
  mon = collapse.Monitor(16, patience=2, compact=True)
  for i, h in enumerate(history, 1):
    mon.update(5 * i, h)
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["pretrain: WARNING: collapsed at step 5 (spread 0.0100, NT-Xent 3.4000 "
                 "vs log(2B-1) 3.4340); embeddings from it carry little information"]
  collapse.Monitor(16, patience=2).update(5, {"embed_std": 0.01})  # default: the box
  collapse.Monitor(16, patience=1).update(5, {"embed_std": 0.01})
  assert capsys.readouterr().out.count("=" * 78) == 2


def test_gallery_rows_say_call_probability_and_threshold():
  assert report.slide_call("S1", [0.31], [0.45], ("label",), [1.0]).splitlines() == [
      "S1", "called negative, label positive", "p=0.31, threshold 0.45"]
  assert report.slide_call("S2", np.array([0.5]), [0.5]).splitlines()[1] == "called positive"
  two = report.slide_call("S3", [0.1, 0.8], [0.5, 0.6], ("a", "b"), [np.nan, np.nan])
  assert two.splitlines()[1:] == ["a: called negative, p=0.10 / thr 0.50",
                                  "b: called positive, p=0.80 / thr 0.60"]


def test_galleries_show_both_classes(monkeypatch):
  labels = np.array([[1.], [1.], [1.], [0.], [0.]])
  probs = [[.9], [.8], [.2], [.4], [.1]]
  assert slides_report.gallery_slides(labels, probs, 4) == [0, 1, 3, 4]
  assert slides_report.gallery_slides(labels, probs, 3) == [0, 1, 3]
  assert slides_report.gallery_slides(labels[:3], probs[:3], 2) == [0, 1]  # no negative
  assert slides_report.gallery_slides(labels[3:], probs[3:], 4) == [0, 1]
  assert slides_report.gallery_slides(labels, probs, 0) == []


def _suptitles(monkeypatch):
  seen = []
  real = matplotlib.figure.Figure.suptitle
  monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                      lambda self, t, **kw: (seen.append(t), real(self, t, **kw))[1])
  return seen


def test_no_witness_legend_without_witness_labels(tmp_path, monkeypatch):
  seen = _suptitles(monkeypatch)
  imgs = [np.zeros((3, 4, 4, 3), np.uint8)]
  att = [np.array([0.2, 0.5, 0.3])]
  report.plot_attention(str(tmp_path / "a.png"), imgs, att, [np.zeros(3, bool)], ["s"], top=2)
  report.plot_attention(str(tmp_path / "b.png"), imgs, att, None, ["s"], top=2)
  report.plot_attention(str(tmp_path / "c.png"), imgs, att, [np.array([0, 1, 0], bool)],
                        ["bag 0"], top=2)
  assert seen == ["Top-attention cells per slide", "Top-attention cells per slide",
                  "Top-attention cells per test bag (red frame = true witness)"]
  assert (tmp_path / "a.png").exists()


def test_cv_galleries_of_a_folder_cohort(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(slides_report.report, "plot_attention",
                      lambda path, images, att, witness, titles, top, title: calls.append(
                          (path, len(images), witness, titles, title)))
  cohort = types.SimpleNamespace(
      slide_ids=("p1", "p2", "n1", "n2"), task_names=("label",),
      labels=np.array([[1.], [1.], [0.], [0.]], np.float32),
      cells=[np.arange(2 * i, 2 * i + 2) for i in range(4)],
      images=np.zeros((8, 4, 4, 3), np.uint8), witness=None)
  rec = {"fold": "fold0", "method": "slam_ags", "test_slides": ["n1", "p1", "n2", "p2"],
         "heads": {"abmil": {"prob": [[.3], [.7], [.6], [.4]], "thresholds": [0.5],
                             "attention": [[.5, .5]] * 4}}}
  slides_report.plot_galleries(str(tmp_path), cohort, [rec], "abmil", per_fold=2)
  (path, n, witness, titles, title), = calls
  assert path.endswith("slam_ags_fold0.png") and n == 2 and witness is None
  assert [t.splitlines()[:2] for t in titles] == [
      ["p1", "called positive, label positive"], ["n2", "called positive, label negative"]]
  assert "witness" not in title and "test bag" not in title
