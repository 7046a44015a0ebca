"""Tests for signnet_jax.metrics with hand-computed cases."""

import csv
import json
import os

import cv2
import numpy as np
import pytest

from signnet_jax import metrics


def test_merge_three_views_per_video_ignores_padding():
    # Views of 2 videos, interleaved, plus two padding views (video -1, invalid).
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # video 0
            [0.1, 0.1, 0.8],  # video 1
            [0.3, 0.6, 0.1],  # video 0
            [0.2, 0.2, 0.6],  # video 1
            [0.0, 0.0, 1.0],  # video 0
            [0.3, 0.3, 0.4],  # video 1
            [1.0, 0.0, 0.0],  # padding
            [1.0, 0.0, 0.0],  # padding
        ]
    )
    video_index = np.array([0, 1, 0, 1, 0, 1, -1, -1])
    valid = np.array([True] * 6 + [False] * 2)
    merged = metrics.merge_views(probs, video_index, valid, 2)
    np.testing.assert_allclose(merged, [[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    assert merged.dtype == np.float64


def test_merging_a_batch_at_a_time_gives_the_same_bits():
    # evaluation adds each batch as it comes instead of holding every view
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=40)
    index = np.concatenate([rng.permutation(10) for _ in range(4)])
    valid = rng.random(40) < 0.9
    valid[:10] = True  # every video keeps a view
    merger = metrics.ViewMerger(10, 7)
    for part in np.array_split(np.arange(40), 3):
        merger.add(probs[part].astype(np.float32), index[part], valid[part])
    whole = metrics.merge_views(probs.astype(np.float32), index, valid, 10)
    np.testing.assert_array_equal(merger.result(), whole)
    for video in range(10):  # each video's valid views, averaged one by one
        views = [probs[i].astype(np.float32) for i in range(40) if valid[i] and index[i] == video]
        np.testing.assert_allclose(whole[video], np.mean(views, axis=0), rtol=1e-6)
    # a padding view may hold anything, even NaN
    nan = np.full((1, 7), np.nan)
    merger.add(nan, [-1], np.zeros(1, bool))
    np.testing.assert_array_equal(merger.result(), whole)
    with pytest.raises(ValueError, match=r"probs has non-finite values \(first in row 1\)"):
        merger.add(np.concatenate([nan, nan]), [-1, 3], np.array([False, True]))
    with pytest.raises(ValueError, match="probs has 3 classes, the merger 7"):
        merger.add(np.ones((1, 3)), [0], np.ones(1, bool))


def test_merge_video_without_views_is_named():
    probs = np.full((3, 2), 0.5)
    with pytest.raises(
        ValueError, match=r"video 1 has no valid view \(2 videos without views: 1, 3"
    ):
        metrics.merge_views(probs, [0, 2, 1], np.array([True, True, False]), 4)


@pytest.mark.parametrize(
    "probs, index, valid, n, message",
    [
        (np.ones((3, 2)), [0, 1], np.ones(3, bool), 2, r"must have shape \(3,\)"),
        (np.ones((3, 2)), [0, 1, 2], np.ones(3, bool), 2, "video_index 2, outside"),
        (np.ones((3, 2)), [0, 1, 0], np.ones(3), 2, "valid must be a bool array"),
        (np.ones(3), [0, 1, 0], np.ones(3, bool), 2, "probs must be a 2-D"),
        (np.array([[np.nan, 1.0]]), [0], np.ones(1, bool), 1, "non-finite values"),
    ],
)
def test_merge_bad_inputs(probs, index, valid, n, message):
    with pytest.raises(ValueError, match=message):
        metrics.merge_views(probs, np.asarray(index), valid, n)


def test_topk_with_a_known_ranking_and_ties():
    # 7 classes; video 0 ranks its label (3) 6th; video 1 ranks its label (0) 1st.
    probs = np.array(
        [
            [0.30, 0.20, 0.15, 0.02, 0.13, 0.12, 0.08],
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.05, 0.05],
            # All tied: stable sort puts class 0 first, so label 4 is 5th (top-5 hit)...
            [1 / 7] * 7,
            # ...and label 5 is 6th (top-5 miss).
            [1 / 7] * 7,
            # Label 2 tied with the maximum at class 1: ranks 2nd (class 1 wins the tie).
            [0.1, 0.4, 0.4, 0.05, 0.05, 0.0, 0.0],
        ]
    )
    labels = np.array([3, 0, 4, 5, 2])
    np.testing.assert_array_equal(metrics.label_ranks(probs, labels), [6, 0, 4, 5, 1])
    names = [f"c{i}" for i in range(7)]
    r = metrics.accuracy_report(probs, labels, names, ks=(1, 2, 5))
    assert r["per_instance"] == {"top1": 1 / 5, "top2": 2 / 5, "top5": 3 / 5}
    assert r["num_videos"] == 5 and r["num_classes"] == 7
    # top1 ties go to the lower index, consistently with the ranks.
    assert metrics.top1_predictions(probs).tolist() == [0, 0, 0, 0, 1]


def test_per_class_definitions_differ_exactly_by_empty_classes():
    # 3 classes, class "b" has no test videos.
    # class a: 2 videos, top-1 hits 1 (top-5 hits 2); class c: 4 videos, top-1 hits 3.
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # a, hit
            [0.2, 0.7, 0.1],  # a, miss (predicted b)
            [0.1, 0.1, 0.8],  # c, hit
            [0.1, 0.2, 0.7],  # c, hit
            [0.2, 0.1, 0.7],  # c, hit
            [0.6, 0.3, 0.1],  # c, miss (predicted a)
        ]
    )
    labels = np.array([0, 0, 2, 2, 2, 2])
    r = metrics.accuracy_report(probs, labels, ["a", "b", "c"], ks=(1, 5))
    assert r["per_instance"]["top1"] == pytest.approx(4 / 6)
    # SignNet: (1/2 + 0 + 3/4) / 3; NLA-SLR: (1/2 + 3/4) / 2.
    assert r["per_class_signnet"]["top1"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert r["per_class_nla"]["top1"] == pytest.approx((0.5 + 0.75) / 2)
    # k = 5 > 3 classes: every video is a hit.
    assert r["per_instance"]["top5"] == 1.0
    assert r["per_class_signnet"]["top5"] == pytest.approx(2 / 3)
    assert r["per_class_nla"]["top5"] == 1.0
    assert r["classes_without_videos"] == ["b"]
    # With every class present, both definitions agree.
    r2 = metrics.accuracy_report(probs[:5], np.array([0, 0, 2, 1, 2]), ["a", "b", "c"])
    assert r2["classes_without_videos"] == []
    assert r2["per_class_signnet"] == r2["per_class_nla"]
    assert r2["per_class_nla"]["top1"] == pytest.approx((1 / 2 + 0 + 1) / 3)


@pytest.mark.parametrize(
    "probs, labels, names, message",
    [
        (np.ones((3, 2)), [0, 1], ["a", "b"], r"labels must have shape \(3,\)"),
        (np.ones((2, 2)), [0, 2], ["a", "b"], r"labels\[1\] = 2 is out of range for 2 classes"),
        (np.ones((2, 2)), [-1, 0], ["a", "b"], r"labels\[0\] = -1 is out of range"),
        (np.ones((2, 2)), [0.0, 1.0], ["a", "b"], "labels must be integers"),
        (np.ones((2, 3)), [0, 1], ["a", "b"], "class_names has 2 names but video_probs has 3"),
        (np.ones((0, 2)), [], ["a", "b"], "no videos"),
        (np.ones((2, 2, 1)), [0, 1], ["a", "b"], "video_probs must be a 2-D"),
    ],
)
def test_bad_inputs_are_named(probs, labels, names, message, tmp_path):
    labels = np.asarray(labels)
    with pytest.raises(ValueError, match=message):
        metrics.accuracy_report(probs, labels, names)
    with pytest.raises(ValueError, match=message):
        metrics.write_per_class_csv(tmp_path / "c.csv", probs, labels, names)
    with pytest.raises(ValueError, match=message):
        metrics.plot_confused_pairs(tmp_path / "p.png", probs, labels, names)
    assert os.listdir(tmp_path) == []


def test_bad_ks():
    with pytest.raises(ValueError, match="ks must be distinct integers >= 1"):
        metrics.accuracy_report(np.ones((1, 2)), np.array([0]), ["a", "b"], ks=(0, 1))


def _confusing_case():
    """6 classes; class 0 -> 1 twice, class 2 -> 1 once and -> 3 once, class 4 has no videos."""
    k = 6
    rows, labels = [], []

    def video(label, predicted, second=None):
        p = np.full(k, 0.01)
        p[predicted] = 0.9
        if second is not None:
            p[second] = 0.05
        rows.append(p / p.sum())
        labels.append(label)

    video(0, 1, second=0)  # top-1 miss, top-5 hit (label ranked 2nd)
    video(0, 1)  # top-1 miss, label tied with 4 others at 0.01: ranks 1st among them -> 2nd
    video(0, 0)
    video(2, 1)
    video(2, 3)
    video(3, 3)
    video(5, 5)
    video(5, 5)
    return np.stack(rows), np.array(labels), ["zero", "one", "two", "three", "four", "five"]


def test_per_class_csv_content(tmp_path):
    probs, labels, names = _confusing_case()
    path = tmp_path / "out" / "per_class.csv"
    metrics.write_per_class_csv(path, probs, labels, names)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(metrics.PER_CLASS_COLUMNS)
    assert rows[1:] == [
        ["0", "zero", "3", "0.3333", "1.0000", "one", "2"],
        ["1", "one", "0", "", "", "", "0"],
        # class 2: -> one and -> three once each; the tie goes to the lower class index.
        ["2", "two", "2", "0.0000", "1.0000", "one", "1"],
        ["3", "three", "1", "1.0000", "1.0000", "", "0"],
        ["4", "four", "0", "", "", "", "0"],
        ["5", "five", "2", "1.0000", "1.0000", "", "0"],
    ]
    assert [n for n in os.listdir(path.parent)] == ["per_class.csv"]


def test_confused_pairs_order():
    probs, labels, _ = _confusing_case()
    assert metrics.confused_pairs(probs, labels) == [(0, 1, 2), (2, 1, 1), (2, 3, 1)]


def _png(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    assert img is not None, f"{path} is not a readable image"
    return img


def test_confused_pairs_plot(tmp_path):
    probs, labels, names = _confusing_case()
    path = tmp_path / "confused.png"
    metrics.plot_confused_pairs(path, probs, labels, names)
    img = _png(path)
    assert img.shape[0] > 200 and img.shape[1] == 800
    # Bars are drawn in the bar colour (#c0504d) and the figure is not blank.
    bar = np.all(np.abs(img.astype(int) - [0xC0, 0x50, 0x4D]) < 8, axis=-1)
    assert bar.sum() > 2000
    assert (img.std(axis=(0, 1)) > 10).all()
    assert os.listdir(tmp_path) == ["confused.png"]


def test_plot_shows_only_the_top_pairs(tmp_path):
    # 30 classes, class i predicted as i+1 (i times, for i = 1..29 with more videos).
    k = 30
    rows, labels = [], []
    for i in range(1, k - 1):
        for _ in range(i):
            p = np.full(k, 0.01)
            p[i + 1] = 1.0
            rows.append(p)
            labels.append(i)
    names = [f"a_rather_long_gloss_name_number_{i}" for i in range(k)]
    small, large = tmp_path / "top3.png", tmp_path / "top20.png"
    metrics.plot_confused_pairs(small, np.stack(rows), np.array(labels), names, top=3)
    metrics.plot_confused_pairs(large, np.stack(rows), np.array(labels), names, top=20)
    assert _png(large).shape[0] > _png(small).shape[0] + 300


def test_plot_without_confusions(tmp_path):
    probs = np.eye(3)
    path = tmp_path / "none.png"
    metrics.plot_confused_pairs(path, probs, np.array([0, 1, 2]), ["a", "b", "c"])
    img = _png(path)
    # Text on white and no bars.
    assert (img < 100).any() and (img == 255).mean() > 0.9
    bar = np.all(np.abs(img.astype(int) - [0xC0, 0x50, 0x4D]) < 8, axis=-1)
    assert bar.sum() == 0


def test_metrics_json_round_trip(tmp_path):
    probs, labels, names = _confusing_case()
    report = metrics.accuracy_report(probs, labels, names)
    report["step"] = np.int64(7)  # numpy scalars are fine
    path = tmp_path / "sub" / "metrics.json"
    metrics.write_metrics_json(path, report)
    loaded = json.loads(path.read_text())
    assert loaded["step"] == 7
    assert loaded["per_instance"] == {"top1": 4 / 8, "top5": 1.0}
    # classes with videos: 0 (1/3), 2 (0), 3 (1), 5 (1); classes 1 and 4 have none.
    assert loaded["per_class_nla"]["top1"] == pytest.approx((1 / 3 + 0 + 1 + 1) / 4)
    assert loaded["per_class_signnet"]["top1"] == pytest.approx((1 / 3 + 0 + 1 + 1) / 6)
    assert loaded["classes_without_videos"] == ["one", "four"]
    assert os.listdir(path.parent) == ["metrics.json"]


def test_metrics_json_refuses_unserializable_without_leaving_a_file(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        metrics.write_metrics_json(path, {"x": object()})
    assert os.listdir(tmp_path) == []


def _colour_pixels(img, rgb):
    return int(np.all(np.abs(img.astype(int) - rgb) < 8, axis=-1).sum())


def test_training_curves_plot(tmp_path):
    loss = [(s, 3.0 * np.exp(-s / 300)) for s in range(50, 2000, 50)]
    val = [(200, 0.2), (400, 0.45), (600, 0.41)]
    path = tmp_path / "curves.png"
    metrics.plot_training_curves(path, loss, val, steps_per_epoch=200, total_steps=2000)
    img = _png(path)
    assert img.shape[:2] == (340, 900)
    assert os.listdir(tmp_path) == ["curves.png"]
    # the loss in blue on the left half, validation in green on the right half
    half = img.shape[1] // 2
    assert _colour_pixels(img[:, :half], [0x1F, 0x77, 0xB4]) > 300
    assert _colour_pixels(img[:, half:], [0x2C, 0xA0, 0x2C]) > 100
    assert _colour_pixels(img[:, half:], [0x1F, 0x77, 0xB4]) == 0

    # before the first validation: the loss only
    metrics.plot_training_curves(path, loss[:2], [], steps_per_epoch=200, total_steps=2000)
    img = _png(path)
    assert _colour_pixels(img, [0x2C, 0xA0, 0x2C]) == 0
    assert _colour_pixels(img, [0x1F, 0x77, 0xB4]) > 20

    with pytest.raises(ValueError, match="steps_per_epoch and total_steps must be >= 1"):
        metrics.plot_training_curves(path, loss, val, steps_per_epoch=0, total_steps=2000)


def test_training_curves_name_the_best_step_that_load_step_best_gives(tmp_path, monkeypatch):
    # equal validation top-1 at two steps: the checkpoint manager keeps the later one and
    # load_step='best' reads it, so the plot must name that step too
    from matplotlib.axes import Axes

    from signnet_jax import checkpointing

    val = [(150, 0.75), (600, 0.9), (750, 0.9), (900, 0.9)]
    ckpt = checkpointing.TrainCheckpointer(tmp_path / "ckpt", keep=1)
    for step, top1 in val:
        ckpt.save(step, {"params": {"w": np.zeros(2, np.float32)}}, {}, {}, {"val_top1": top1})
    ckpt.wait()
    ckpt.close()
    kept_best = checkpointing.select_step(tmp_path / "ckpt", "best")
    assert kept_best == 600  # the first to reach 0.9, as the original's checkpoint-best

    titles = []
    real = Axes.set_title
    monkeypatch.setattr(
        Axes,
        "set_title",
        lambda self, label, *a, **k: titles.append(label) or real(self, label, *a, **k),
    )
    metrics.plot_training_curves(tmp_path / "c.png", [(100, 1.0)], val, 30, 900)
    assert f"validation top-1 (%): best 90.00 at step {kept_best}" in titles
    assert metrics.best_point(val) == (kept_best, 0.9)
