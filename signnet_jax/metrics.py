"""Test metrics of the published protocol: multi-view merging, P-I / P-C top-k, reports.

Pure numpy (plus matplotlib for the confusion plot); no JAX, so it runs anywhere.

* `merge_views`: the softmax probabilities of a video's views (temporal clips x spatial
  crops) averaged into one distribution per video (`ViewMerger`: a batch at a time).
* `accuracy_report`: per-instance (P-I) top-k, the accuracy over videos, and per-class (P-C)
  top-k, the mean over classes of each class's accuracy, in both published definitions:
  `per_class_signnet` averages over all classes and scores a class without test videos as 0
  (SignNet's code); `per_class_nla` ignores such classes (NLA-SLR's code). They differ only
  when a class has no test videos (WLASL2000: `caterpillar`).

Top-k and ties: a video is a top-k hit when its label is among the first k classes of a
stable descending sort of its probabilities, so tied probabilities rank by class index
(lower first). k larger than the number of classes counts every video as a hit.

Accuracies are fractions in [0, 1]. Files are written under a temporary name and renamed,
so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from signnet_jax.files import atomic_write

# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_probs(probs: Any, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """``probs`` as float64; ``rows``: a bool mask of the rows that must be finite (all)."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (num, num_classes) array, got shape {probs.shape}")
    if probs.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {probs.dtype}")
    bad = ~np.isfinite(probs).all(axis=1)
    if rows is not None:
        bad &= rows
    if bad.any():
        raise ValueError(f"{name} has non-finite values (first in row {np.flatnonzero(bad)[0]})")
    return probs.astype(np.float64)


def _check_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) to match the probabilities, got {labels.shape}"
        )
    if n and labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    out = (labels < 0) | (labels >= num_classes)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"{name}[{i}] = {labels[i]} is out of range for {num_classes} classes "
            f"({int(out.sum())} labels out of range)"
        )
    return labels


def _check_inputs(
    video_probs: Any, labels: Any, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    probs = _check_probs(video_probs, "video_probs")
    names = [str(c) for c in class_names]
    if len(names) != probs.shape[1]:
        raise ValueError(
            f"class_names has {len(names)} names but video_probs has {probs.shape[1]} classes"
        )
    if probs.shape[0] == 0:
        raise ValueError("no videos: video_probs has 0 rows")
    return probs, _check_labels(labels, probs.shape[0], probs.shape[1]), names


# --------------------------------------------------------------------------------------------
# Merging views and ranking
# --------------------------------------------------------------------------------------------


def merge_views(probs: Any, video_index: Any, valid: Any, num_videos: int) -> np.ndarray:
    """Averages the softmax probabilities of each video's valid views (multi-view test).

    Args:
      probs: (V, K) softmax probabilities of V views.
      video_index: (V,) int, the video each view belongs to (anything on invalid views,
        e.g. the pipeline's -1 padding).
      valid: (V,) bool, False for padding views, which are ignored.
      num_videos: number of videos N.

    Returns:
      (N, K) float64 mean probabilities per video.

    Raises:
      ValueError: shapes disagree, a valid view names a video outside [0, N), or a video
        has no valid view (the message names it).
    """
    probs = np.asarray(probs)
    merger = ViewMerger(num_videos, probs.shape[1] if probs.ndim == 2 else 1)
    merger.add(probs, video_index, valid)  # checks the arguments
    return merger.result()


class ViewMerger:
    """``merge_views`` a batch of views at a time: it keeps each video's sum of probabilities
    and view count, not every view (a test split of 33k videos x 3 views x 2,731 classes
    would hold 1 GB of views per copy). Sums in view order, so the result is the same.
    """

    def __init__(self, num_videos: int, num_classes: int):
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        self.sums = np.zeros((num_videos, num_classes), np.float64)
        self.counts = np.zeros(num_videos, np.int64)

    def add(self, probs: Any, video_index: Any, valid: Any) -> None:
        """Adds a batch of views (arguments as ``merge_views``'; padding views may hold
        anything)."""
        probs = np.asarray(probs)
        v = probs.shape[0] if probs.ndim else 0
        video_index = np.asarray(video_index)
        valid = np.asarray(valid)
        if video_index.shape != (v,) or valid.shape != (v,):
            raise ValueError(
                f"video_index and valid must have shape ({v},) to match probs {probs.shape}, "
                f"got {video_index.shape} and {valid.shape}"
            )
        if valid.dtype != np.bool_:
            raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")
        probs = _check_probs(probs, "probs", rows=valid)
        if probs.shape[1] != self.sums.shape[1]:
            raise ValueError(f"probs has {probs.shape[1]} classes, the merger {self.sums.shape[1]}")
        idx = video_index[valid]
        if idx.size and idx.dtype.kind not in "iu":
            raise ValueError(f"video_index must be integers, got dtype {video_index.dtype}")
        idx = idx.astype(np.int64)
        num_videos = self.counts.shape[0]
        out = (idx < 0) | (idx >= num_videos)
        if out.any():
            raise ValueError(
                f"a valid view has video_index {int(idx[out][0])}, outside [0, {num_videos})"
            )
        np.add.at(self.sums, idx, probs[valid])
        self.counts += np.bincount(idx, minlength=num_videos)

    def result(self) -> np.ndarray:
        """(N, K) float64 mean probabilities per video; every video must have a view."""
        missing = np.flatnonzero(self.counts == 0)
        if missing.size:
            shown = ", ".join(str(i) for i in missing[:10])
            raise ValueError(
                f"video {missing[0]} has no valid view ({missing.size} videos without views: "
                f"{shown}{', ...' if missing.size > 10 else ''}); the eval pass did not cover "
                "every video"
            )
        return self.sums / self.counts[:, None]


def label_ranks(video_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each video's label in a stable descending sort of its probabilities.

    Ties rank by class index: a class ranks above the label when its probability is higher,
    or equal with a lower class index. Top-k hit <=> rank < k.

    Args:
      video_probs: (N, K) probabilities.
      labels: (N,) class indices.

    Returns:
      (N,) int64 ranks.
    """
    p = video_probs[np.arange(len(labels)), labels][:, None]
    cls = np.arange(video_probs.shape[1])[None, :]
    above = (video_probs > p) | ((video_probs == p) & (cls < labels[:, None]))
    return above.sum(axis=1).astype(np.int64)


def top1_predictions(video_probs: np.ndarray) -> np.ndarray:
    """(N,) top-1 class of each video; ties go to the lower class index (as label_ranks)."""
    return np.argmax(video_probs, axis=1)  # argmax returns the first maximum


# --------------------------------------------------------------------------------------------
# Accuracies
# --------------------------------------------------------------------------------------------


def _per_class_hits(ranks: np.ndarray, labels: np.ndarray, num_classes: int, k: int):
    videos = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=(ranks < k).astype(np.float64), minlength=num_classes)
    return videos, hits


def accuracy_report(
    video_probs: Any,
    labels: Any,
    class_names: Sequence[str],
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Per-instance and per-class top-k accuracies (fractions in [0, 1]).

    Args:
      video_probs: (N, K) per-video probabilities (e.g. from `merge_views`).
      labels: (N,) true class indices.
      class_names: K class names.
      ks: the k of top-k (each >= 1).

    Returns:
      {"num_videos", "num_classes",
       "per_instance": {"top1": ..., "top5": ...}            accuracy over videos,
       "per_class_signnet": {...}  mean over ALL classes, a class without videos scores 0,
       "per_class_nla": {...}      mean over classes that have videos,
       "classes_without_videos": [names]}.
    """
    probs, labels, names = _check_inputs(video_probs, labels, class_names)
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct integers >= 1, got {ks}")
    n, num_classes = probs.shape
    ranks = label_ranks(probs, labels)
    videos = np.bincount(labels, minlength=num_classes)
    has = videos > 0
    report: dict[str, Any] = {
        "num_videos": int(n),
        "num_classes": int(num_classes),
        "per_instance": {},
        "per_class_signnet": {},
        "per_class_nla": {},
        "classes_without_videos": [names[c] for c in np.flatnonzero(~has)],
    }
    for k in ks:
        _, hits = _per_class_hits(ranks, labels, num_classes, k)
        per_class = np.divide(hits, videos, out=np.zeros(num_classes), where=has)
        report["per_instance"][f"top{k}"] = float(np.mean(ranks < k))
        report["per_class_signnet"][f"top{k}"] = float(per_class.mean())
        report["per_class_nla"][f"top{k}"] = float(per_class[has].mean())
    return report


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_metrics_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Writes a report (e.g. `accuracy_report`'s, possibly extended) as indented JSON.

    Args:
      path: output file; its folder is created.
      report: JSON-able dict (numpy scalars and arrays are converted).
    """

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"metrics report: {type(o).__name__} is not JSON serializable")

    atomic_write(path, (json.dumps(report, indent=1, default=default) + "\n").encode())


def confused_pairs(video_probs: Any, labels: Any) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of every top-1 confusion, most frequent first.

    Args:
      video_probs: (N, K) probabilities.
      labels: (N,) true class indices.

    Returns:
      Pairs with true != predicted, sorted by count (descending), then true, then predicted.
    """
    probs = _check_probs(video_probs, "video_probs")
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    pred = top1_predictions(probs)
    wrong = pred != labels
    counter = collections.Counter(zip(labels[wrong].tolist(), pred[wrong].tolist(), strict=True))
    return sorted(((t, p, c) for (t, p), c in counter.items()), key=lambda x: (-x[2], x[0], x[1]))


PER_CLASS_COLUMNS = (
    "class_index",
    "gloss",
    "videos",
    "top1",
    "top5",
    "most_confused_with",
    "confused_count",
)


def write_per_class_csv(
    path: str | os.PathLike, video_probs: Any, labels: Any, class_names: Sequence[str]
) -> None:
    """Writes one CSV row per class (columns PER_CLASS_COLUMNS).

    top1 / top5 are the class's accuracy as fractions with 4 decimals (empty for a class
    without videos); most_confused_with is the gloss the class's videos are most often
    predicted as (top-1, ties to the lower class index) and confused_count how often (empty
    and 0 when never confused).

    Args:
      path: output file; its folder is created.
      video_probs: (N, K) per-video probabilities.
      labels: (N,) true class indices.
      class_names: K class names.
    """
    probs, labels, names = _check_inputs(video_probs, labels, class_names)
    num_classes = probs.shape[1]
    ranks = label_ranks(probs, labels)
    videos, hits1 = _per_class_hits(ranks, labels, num_classes, 1)
    _, hits5 = _per_class_hits(ranks, labels, num_classes, 5)
    worst: dict[int, tuple[int, int]] = {}
    for t, p, c in confused_pairs(probs, labels):  # most frequent first
        worst.setdefault(t, (p, c))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for c in range(num_classes):
        n = int(videos[c])
        top1 = f"{hits1[c] / n:.4f}" if n else ""
        top5 = f"{hits5[c] / n:.4f}" if n else ""
        pred, count = worst.get(c, (None, 0))
        writer.writerow([c, names[c], n, top1, top5, "" if pred is None else names[pred], count])
    atomic_write(path, buf.getvalue().encode("utf-8"))


def short_name(name: str, limit: int = 28) -> str:
    """A class name cut to ``limit`` characters for plot labels."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot_confused_pairs(
    path: str | os.PathLike,
    video_probs: Any,
    labels: Any,
    class_names: Sequence[str],
    top: int = 20,
) -> None:
    """Writes a PNG bar chart of the `top` most frequent (true -> predicted) confusions.

    Args:
      path: output PNG; its folder is created.
      video_probs: (N, K) per-video probabilities.
      labels: (N,) true class indices.
      class_names: K class names.
      top: number of pairs shown (>= 1).
    """
    # Figure + Agg canvas directly: no pyplot, so no global backend switch or figure leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs, labels, names = _check_inputs(video_probs, labels, class_names)
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    pairs = confused_pairs(probs, labels)
    n = len(labels)
    num_wrong = sum(c for _, _, c in pairs)
    shown = pairs[:top]
    fig = Figure(figsize=(8, 1.6 + 0.32 * max(len(shown), 3)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not shown:
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            f"No confusions: all {n} videos correct at top-1",
            ha="center",
            va="center",
            fontsize=13,
        )
        ax.set_title("Most confused class pairs (true → predicted)")
    else:
        counts = [c for _, _, c in shown]
        ylabels = [f"{short_name(names[t])} → {short_name(names[p])}" for t, p, _ in shown]
        y = np.arange(len(shown))
        ax.barh(y, counts, height=0.7, color="#c0504d")
        ax.set_ylim(len(shown) - 0.4, -0.6)  # most frequent on top, even spacing for few bars
        ax.set_yticks(y, ylabels, fontsize=9)
        for yi, c in zip(y, counts, strict=True):
            ax.text(c, yi, f" {c}", va="center", fontsize=9)
        ax.set_xlim(0, max(counts) * 1.12 + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("videos")
        fig.suptitle(
            "Most confused class pairs (true → predicted)\n"
            f"top {len(shown)} of {len(pairs)} pairs; {num_wrong} of {n} videos wrong at top-1",
            fontsize=11,
        )
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def best_point(val_top1: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """The (step, top-1) of the best validation; the earliest of equal values.

    The same rule as ``checkpointing.select_step(..., 'best')`` and the checkpoint manager's
    keep-the-best policy, so the step a plot or log names is the step that is kept and loaded.
    """
    if not val_top1:
        raise ValueError("no validation results")
    step, value = max(val_top1, key=lambda p: (p[1], -p[0]))
    return int(step), float(value)


def plot_training_curves(
    path: str | os.PathLike,
    train_loss: Sequence[tuple[int, float]],
    val_top1: Sequence[tuple[int, float]],
    steps_per_epoch: int,
    total_steps: int,
) -> None:
    """Writes a PNG of the training loss and the validation top-1 against the step.

    Args:
      path: output PNG (written atomically); its folder is created.
      train_loss: (step, mean loss since the previous point) pairs.
      val_top1: (step, top-1 in [0, 1]) pairs; may be empty.
      steps_per_epoch: updates per epoch (the top axis counts epochs).
      total_steps: the schedule's length (the x range).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch and total_steps must be >= 1, got {steps_per_epoch}, "
                         f"{total_steps}")  # fmt: skip
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    for ax, points, colour, title in (
        (ax_loss, train_loss, "#1f77b4", "training loss"),
        (ax_val, [(s, 100 * v) for s, v in val_top1], "#2ca02c", "validation top-1 (%)"),
    ):
        ax.set_title(title, fontsize=11, pad=8)
        ax.set_xlim(0, total_steps)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if points:
            x, y = np.asarray(points, np.float64).T
            ax.plot(x, y, color=colour, marker="o" if len(x) < 30 else None, ms=3, lw=1.4)
        else:
            ax.text(0.5, 0.5, "none yet", transform=ax.transAxes, ha="center", color="0.5")
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
        )
        top.set_xlabel("epoch", fontsize=9, labelpad=2)
        top.tick_params(labelsize=8)
    ax_val.set_ylim(0, 100)
    if val_top1:
        best_step, best = best_point(val_top1)
        # not clipped: the best is often the last step, on the axis' edge
        ax_val.plot([best_step], [100 * best], "*", color="#2ca02c", ms=11, clip_on=False)
        ax_val.set_title(
            f"validation top-1 (%): best {100 * best:.2f} at step {best_step}", fontsize=11, pad=8
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
