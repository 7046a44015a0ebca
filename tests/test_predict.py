"""predict: raw video -> H&HT -> multi-view test views -> averaged softmax -> top-k glosses."""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_prep.build_records import encode_jpeg
from signnet_jax import checkpointing, convert, predict
from signnet_jax.data import device, pipeline, records
from signnet_jax.hht import HHTSettings, read_video, write_video
from signnet_jax.models import vit
from tests.models import torch_vit
from tests.models.helpers import torch_state

CLASSES = ["hello", "book", "drink", "computer", "before"]
TINY_CLASSES = [f"gloss{i}" for i in range(7)]
# A training-style checkpoint with non-default test views: 2 clips x 2 crops, stride 3.
TINY_INPUT = {
    "num_frames": 4,
    "sampling_rate": 3,
    "img_size": 32,
    "short_side_size": 48,
    "test_num_segment": 2,
    "test_num_crop": 2,
}
TINY_HHT = HHTSettings(size=64, layout="strip").to_dict()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A ViT-S converted from a PyTorch VideoMAEv2 state dict with a class list (4 x 32 px)."""
    root = tmp_path_factory.mktemp("converted")
    tmodel = torch_vit.make("S", len(CLASSES), num_frames=4, img_size=32, seed=3)
    torch.save({k: torch.from_numpy(v) for k, v in torch_state(tmodel).items()}, root / "s.pth")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    args = ["--input", root / "s.pth", "--output", root / "ckpt", "--model", "S"]
    args += ["--num-frames", "4", "--num-classes", len(CLASSES), "--img-size", "32"]
    assert convert.main([str(a) for a in args + ["--class-list", root / "classes.txt"]]) == 0
    return root / "ckpt"


def _tiny_model():
    cfg = vit.ViTConfig.from_preset(
        "S", embed_dim=48, depth=1, num_heads=2, mlp_dim=96, num_frames=4, img_size=32,
        num_classes=len(TINY_CLASSES), init_scale=1.0,
    )  # fmt: skip
    return cfg, vit.params_of(vit.create_model(cfg))


def _save_tiny(directory, **meta_overrides):
    cfg, params = _tiny_model()
    meta = {
        "model": cfg.to_dict(),
        "classes": TINY_CLASSES,
        "hht": TINY_HHT,
        "input": TINY_INPUT,
        "source": {"format": "test"},
    }
    meta.update(meta_overrides)
    checkpointing.save_model(directory, params, meta)
    return directory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir: the model checkpoint lives in WORKDIR/checkpoints."""
    root = tmp_path_factory.mktemp("workdir")
    _save_tiny(root / "checkpoints")
    return root


@pytest.fixture(scope="module")
def converted_run(converted, sign_sample):
    with predict.Predictor(converted) as p:
        return p.run(sign_sample, top_k=3), p


@pytest.fixture(scope="module")
def tiny_run(workdir, sign_sample):
    with predict.Predictor(workdir) as p:
        return p.run(sign_sample, top_k=10)


def _reference_probabilities(checkpoint, views):
    """Per-view softmax of the model applied directly, averaged (no jit, no batching)."""
    params, meta = checkpointing.load_model(checkpoint)
    model = vit.model_from_params(vit.ViTConfig.from_dict(meta["model"]), params)
    logits = np.asarray(model(device.normalize(jnp.asarray(views))), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).mean(0)


def _check_top_k(top, probabilities, classes, k):
    assert [t["rank"] for t in top] == list(range(1, k + 1))
    labels = [t["label"] for t in top]
    assert len(set(labels)) == k
    assert [t["gloss"] for t in top] == [classes[i] for i in labels]
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= q <= 1.0 for q in probs) and sum(probs) <= 1.0 + 1e-9
    assert probs == [float(probabilities[i]) for i in labels]
    # The top k are the k largest.
    assert min(probs) >= np.delete(probabilities, labels).max(initial=0.0)


def test_converted_checkpoint_top_k(converted_run, converted):
    run, predictor = converted_run
    report = run.report
    _check_top_k(report["top_k"], run.probabilities, CLASSES, 3)
    assert run.probabilities.shape == (len(CLASSES),)
    assert run.probabilities.sum() == pytest.approx(1.0, abs=1e-6)
    # Converted checkpoints carry no input settings: the published defaults, 3 clips x 1 crop.
    assert run.views.shape == (3, 4, 32, 32, 3) and run.views.dtype == np.uint8
    assert report["views"] == {
        "count": 3, "clips": 3, "crops": 1, "frames_per_clip": 4, "sampling_rate": 2, "size": 32,
        "train_fps": None,  # a converted checkpoint does not know it
    }  # fmt: skip
    np.testing.assert_allclose(
        run.probabilities, _reference_probabilities(converted, run.views), rtol=1e-5, atol=1e-7
    )
    assert predictor.hht_settings == HHTSettings()
    assert (
        "the checkpoint records no H&HT settings; using the defaults (convert published SignNet "
        "weights with --hht faithful to get the original's)"
    ) in predictor.notes
    assert any("no H&HT settings" in n for n in report["notes"])
    assert any("no test-view settings" in n for n in report["notes"])
    assert report["hht"]["frames"] == 76 and report["hht"]["source_size"] == [256, 256]
    assert report["hht"]["coverage"]["head"]["located"] >= 70
    assert report["warnings"] == []


def test_training_checkpoint_uses_its_hht_and_view_settings(tiny_run, workdir):
    run = tiny_run
    # top_k 10 is capped at the 7 classes, so the probabilities sum to 1.
    _check_top_k(run.report["top_k"], run.probabilities, TINY_CLASSES, 7)
    assert sum(t["probability"] for t in run.report["top_k"]) == pytest.approx(1.0, abs=1e-6)
    assert run.report["checkpoint"] == str(workdir / "checkpoints")
    assert run.hht.frames.shape == (76, 64, 64, 3)  # TINY_HHT size
    assert run.views.shape == (4, 4, 48, 48, 3)  # 2 clips x 2 crops at short side 48
    assert run.report["notes"] == []
    np.testing.assert_allclose(
        run.probabilities,
        _reference_probabilities(workdir / "checkpoints", run.views),
        rtol=1e-5,
        atol=1e-7,
    )


def test_views_are_the_eval_pipelines_views(tiny_run, tmp_path):
    # Store the same tunnelled video as data_prep would, evaluate it with the input
    # pipeline: the clips must be identical, bit for bit.
    frames = [encode_jpeg(f, 90) for f in tiny_run.hht.frames]
    name = records.shard_name("test", 0, 1)
    with records.TFRecordWriter(tmp_path / name) as w:
        w.write(records.encode_example({"video_id": "v", "label": 0, "frames": frames}))
    info = {
        "classes": TINY_CLASSES,
        "splits": {"test": {"shards": [{"file": name, "num_records": 1}]}},
    }
    (tmp_path / records.DATASET_INFO).write_text(json.dumps(info))
    s = TINY_INPUT
    ds, info = pipeline.eval_dataset(
        str(tmp_path), "test", mode="test", global_batch_size=4, clip_len=s["num_frames"],
        sampling_rate=s["sampling_rate"], num_segment=s["test_num_segment"],
        num_crop=s["test_num_crop"], short_side_size=s["short_side_size"],
        crop_size=s["img_size"], process_index=0, process_count=1,
    )  # fmt: skip
    batch = next(iter(ds))
    assert info.num_views == 4 and batch["valid"].all()
    np.testing.assert_array_equal(batch["clip"], tiny_run.views)


def test_jpeg_round_trip_matches_the_record_builder(tiny_run):
    frames = tiny_run.hht.frames[:3]
    assert predict._jpeg_round_trip(frames, 90) == [encode_jpeg(f, 90) for f in frames]


def test_batch_size_does_not_change_the_probabilities(workdir, tiny_run):
    # Default on a CPU: one view per call; 3 leaves a padded last batch; 9 is capped at 4.
    with predict.Predictor(workdir) as p:
        assert p.batch_size == 1
    for batch, compiled in ((3, 3), (9, 4)):
        with predict.Predictor(workdir, batch_size=batch) as p:
            assert p.batch_size == compiled
            probs = p._average_probabilities(tiny_run.views)
        np.testing.assert_allclose(probs, tiny_run.probabilities, rtol=1e-6, atol=1e-8)


def test_the_training_machines_attention_kernel_is_not_reused(tmp_path, tiny_run):
    # a run trained on a GPU with cuDNN attention (and on a TPU with the blocks as one scan),
    # predicted on this CPU
    cfg, _ = _tiny_model()
    trained = {**cfg.to_dict(), "attention": "cudnn", "scan_layers": True}
    ckpt = _save_tiny(tmp_path / "gpu_run", model=trained)
    with predict.Predictor(ckpt) as p:
        assert p.model_cfg.attention == "auto" and not p.model_cfg.scan_layers
        probs = p._average_probabilities(tiny_run.views)
    np.testing.assert_allclose(probs, tiny_run.probabilities, rtol=1e-6, atol=1e-8)


def test_a_float16_checkpoint_predicts_in_its_dtype_or_bfloat16_on_a_tpu(tmp_path, tiny_run):
    # trained on a T4 in float16: this CPU runs float16 as trained, a TPU bfloat16 (with a note)
    cfg, _ = _tiny_model()
    f16 = vit.ViTConfig.from_dict({**cfg.to_dict(), "dtype": "float16"})
    assert predict.model_for_platform(f16, "gpu") == (f16, None)
    on_tpu, note = predict.model_for_platform(f16, "tpu")
    assert on_tpu == vit.ViTConfig.from_dict({**f16.to_dict(), "dtype": "bfloat16"})
    assert note == "the checkpoint computes in float16, which does not run here: bfloat16 instead"
    ckpt = _save_tiny(tmp_path / "t4_run", model=f16.to_dict())
    with predict.Predictor(ckpt) as p:
        assert p.model_cfg.dtype == "float16" and not p.notes
        probs = p._average_probabilities(tiny_run.views)
    np.testing.assert_allclose(probs, tiny_run.probabilities, rtol=0, atol=2e-3)


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    """A real (tiny) training run: configs/smoke.py for a few steps."""
    from configs import smoke
    from signnet_jax import train

    root = tmp_path_factory.mktemp("smoke")
    config = smoke.get_config()
    config.records_dir = str(root / "records")
    config.optim.epochs = 2
    config.train.max_steps = 3
    train.train_and_evaluate(config, str(root / "workdir"))
    return root


@pytest.mark.heavy
def test_smoke_trained_checkpoint(smoke_workdir, sign_sample):
    info = records.load_dataset_info(smoke_workdir / "records")
    # the run validated at its last step, 3: that is also the best step by val top-1
    with predict.Predictor(smoke_workdir / "workdir", step="best") as p:
        run = p.run(sign_sample)
        assert p.step == 3 and p.notes == []
        # Class names and H&HT settings travel from the records through the checkpoint.
        assert p.classes == info["classes"]
        assert p.hht_settings == HHTSettings.from_dict(info["hht_settings"])
        assert p.input_settings == predict.InputSettings(8, 2, 64, 64, 3, 1, 90)
        # and so does the training videos' frame rate
        assert p.train_fps == info["splits"]["train"]["fps"]["median"] == 25.0
    _check_top_k(run.report["top_k"], run.probabilities, info["classes"], 5)
    assert run.views.shape == (3, 8, 64, 64, 3)
    assert run.report["checkpoint"] == str(smoke_workdir / "workdir" / "checkpoints")
    np.testing.assert_allclose(
        run.probabilities,
        _reference_probabilities(smoke_workdir / "workdir" / "checkpoints", run.views),
        rtol=1e-5,
        atol=1e-7,
    )


def test_no_class_names_reports_class_indices(tmp_path, sign_sample):
    ckpt = _save_tiny(tmp_path / "ckpt", classes=None, input=None, hht=None)
    with predict.Predictor(ckpt) as p:
        assert p.classes == [f"class_{i}" for i in range(7)]
        assert any("no class names" in n for n in p.notes)


def test_rank_classes_breaks_ties_by_index():
    top = predict.rank_classes(np.array([0.2, 0.4, 0.2, 0.2]), list("abcd"), 3)
    assert [(t["label"], t["gloss"]) for t in top] == [(1, "b"), (0, "a"), (2, "c")]


# --------------------------------------------------------------------------------- CLI


def _cli(capsys, *args):
    code = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_schema_and_saved_hht_video(converted, sign_sample, tmp_path, capsys):
    out_mp4 = tmp_path / "hht.mp4"
    code, out, err = _cli(
        capsys, "--checkpoint", converted, "--video", sign_sample, "--json", "--top-k", "2",
        "--save-hht", out_mp4, "--batch", "2",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)  # stdout is exactly one JSON object
    assert set(report) == {
        "video", "source", "checkpoint", "step", "top_k", "views", "hht", "timings_ms",
        "warnings", "notes",
    }  # fmt: skip
    assert report["source"] == {
        "frames": 76, "fps": 25.0, "start_frame": 0, "end_frame": None, "resampled_to_fps": None,
    }  # fmt: skip
    assert report["video"] == str(sign_sample) and report["step"] == 0
    assert report["checkpoint"] == str(converted)
    assert len(report["top_k"]) == 2
    for t in report["top_k"]:
        assert set(t) == {"rank", "label", "gloss", "probability"}
        assert t["gloss"] == CLASSES[t["label"]]
    probs = [t["probability"] for t in report["top_k"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
    stages = ["load", "compile", "decode", "hht", "views", "inference", "save_hht", "total"]
    assert list(report["timings_ms"]) == stages
    assert all(v >= 0 for v in report["timings_ms"].values())
    assert report["timings_ms"]["total"] >= sum(report["timings_ms"][s] for s in stages[:-1]) - 1
    assert set(report["hht"]["coverage"]) == {"head", "right_hand", "left_hand"}
    assert "timings: load" in err and f"wrote {out_mp4}" in err
    # The saved tunnelled video plays back: every frame, full size, the source rate.
    frames, fps = read_video(out_mp4)
    assert frames.shape == (76, 256, 256, 3) and fps == pytest.approx(25.0)
    assert [p.name for p in tmp_path.iterdir()] == ["hht.mp4"]  # no temp files left


def test_cli_text_output(workdir, tiny_run, sign_sample, capsys):
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", sign_sample, "--top-k", "3")
    assert code == 0, err
    c = {part: n["located"] for part, n in tiny_run.report["hht"]["coverage"].items()}
    assert out.splitlines()[:4] == [
        f"{sign_sample}: 76 frames, 25 fps, 256x256",
        f"checkpoint {workdir / 'checkpoints'} (step 0)",
        f"H&HT: head {c['head']}/76 frames, right hand {c['right_hand']}/76 frames, left hand "
        f"{c['left_hand']}/76 frames",
        "views: 2 clips x 2 crops of 4 frames (every 3), 48 px",
    ]
    # the in-process run's three most likely glosses, ranked, probabilities to 4 places
    assert out.splitlines()[4:] == [
        f"  {t['rank']}. {t['gloss']}  {t['probability']:.4f}" for t in tiny_run.report["top_k"][:3]
    ]


def _expect_error(capsys, message, *args):
    code, out, err = _cli(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err, err
    return err


def test_cli_missing_checkpoint(tmp_path, sign_sample, capsys):
    missing = tmp_path / "nope"
    _expect_error(
        capsys, f"checkpoint {missing} does not exist", "--checkpoint", missing, "--video",
        sign_sample,
    )  # fmt: skip


def test_cli_checkpoint_is_a_file(tmp_path, sign_sample, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    _expect_error(
        capsys, "is a file; pass the folder written by signnet_jax.convert",
        "--checkpoint", tmp_path / "model.ckpt", "--video", sign_sample,
    )  # fmt: skip
    # PyTorch weights: the conversion that makes a checkpoint of them
    for name in ("model.pth", "MODEL.SAFETENSORS"):
        (tmp_path / name).write_bytes(b"x")
        err = _expect_error(capsys, "", "--checkpoint", tmp_path / name, "--video", sign_sample)
        assert err == (
            f"error: checkpoint {tmp_path / name} is a PyTorch weights file; convert it first "
            f"(python -m signnet_jax.convert --input {tmp_path / name} --output DIR --model "
            "PRESET --num-frames T --num-classes N --class-list CLASSES), then pass DIR\n"
        )


def test_cli_folder_that_is_not_a_checkpoint(tmp_path, sign_sample, capsys):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "dataset_info.json").write_text("{}")
    _expect_error(
        capsys, "is not a checkpoint", "--checkpoint", tmp_path / "records", "--video", sign_sample
    )


def test_cli_workdir_without_checkpoint_steps(tmp_path, sign_sample, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    _expect_error(
        capsys, "holds no checkpoint steps yet", "--checkpoint", tmp_path / "run", "--video",
        sign_sample,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("7", "has no step 7; it holds steps [0]"),
        ("best", "no step records a validation top-1"),
        ("last", "step 'last': use 'latest', 'best' or a step number"),
    ],
)
def test_cli_step_that_the_checkpoint_does_not_have(workdir, sign_sample, capsys, step, message):
    _expect_error(capsys, message, "--checkpoint", workdir, "--video", sign_sample, "--step", step)


def test_cli_checkpoint_without_model_config(tmp_path, sign_sample, capsys):
    _, params = _tiny_model()
    checkpointing.save_model(tmp_path / "ckpt", params, {"classes": TINY_CLASSES})
    _expect_error(
        capsys, "metadata has no model config", "--checkpoint", tmp_path / "ckpt", "--video",
        sign_sample,
    )  # fmt: skip


def test_cli_class_list_that_does_not_fit_the_head(tmp_path, sign_sample, capsys):
    ckpt = _save_tiny(tmp_path / "ckpt", classes=["a", "b"])
    _expect_error(
        capsys, "lists 2 class names but the model head has 7 classes",
        "--checkpoint", ckpt, "--video", sign_sample,
    )  # fmt: skip


def test_cli_parameters_that_do_not_fit_the_config(tmp_path, sign_sample, capsys):
    cfg, _ = _tiny_model()
    ckpt = _save_tiny(tmp_path / "ckpt", model={**cfg.to_dict(), "embed_dim": 64})
    _expect_error(
        capsys, "parameters do not fit the model config", "--checkpoint", ckpt, "--video",
        sign_sample,
    )  # fmt: skip


def test_cli_bad_input_settings(tmp_path, sign_sample, capsys):
    ckpt = _save_tiny(tmp_path / "ckpt", input={**TINY_INPUT, "test_num_crop": 0})
    _expect_error(
        capsys, "test_num_crop must be a positive integer", "--checkpoint", ckpt, "--video",
        sign_sample,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"crops": 3},
            "unusable checkpoint metadata: unknown input settings ['crops']; known are "
            "['img_size', 'jpeg_quality', 'num_frames', 'sampling_rate', 'short_side_size', "
            "'test_num_crop', 'test_num_segment']",
        ),
        (
            {"num_frames": 8},
            "unusable checkpoint metadata: input num_frames 8 differs from the model's 4",
        ),
        (  # test views the 16-pixel patches do not divide
            {"short_side_size": 40},
            "the model cannot take (2, 4, 40, 40, 3) clips: clip shape (4, 40, 40) (frames, "
            "height, width) must be divisible by (2, 16, 16)",
        ),
    ],
    ids=["unknown_setting", "other_num_frames", "views_the_patches_do_not_divide"],
)
def test_cli_input_settings_the_model_cannot_use(tmp_path, sign_sample, capsys, change, message):
    ckpt = _save_tiny(tmp_path / "ckpt", input={**TINY_INPUT, **change})
    code, out, err = _cli(
        capsys, "--checkpoint", ckpt, "--video", sign_sample, "--batch", "2",
        "--save-hht", tmp_path / "hht.mp4", "--preview", tmp_path / "preview.png",
    )  # fmt: skip
    assert (code, out, err) == (1, "", f"error: {ckpt}: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_folder_without_videos_and_save_hht_not_mp4(workdir, sign_sample, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a video\n")
    _expect_error(
        capsys, f"video folder {tmp_path} holds no video files (.mp4 .mov",
        "--checkpoint", workdir, "--video", tmp_path,
    )  # fmt: skip
    _expect_error(
        capsys, "must end in .mp4", "--checkpoint", workdir, "--video", sign_sample,
        "--save-hht", tmp_path / "out.avi",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_save_hht_that_cannot_be_written_stops_first(workdir, sign_sample, tmp_path, capsys):
    _expect_error(
        capsys, "cannot write --save-hht /proc/out.mp4: ", "--checkpoint", workdir, "--video",
        sign_sample, "--save-hht", "/proc/out.mp4",
    )  # fmt: skip
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(sign_sample.read_bytes())
    (tmp_path / "sub").mkdir()
    for same in (copy, tmp_path / "sub" / ".." / "clip.mp4"):
        _expect_error(
            capsys, f"--save-hht {same} is the input video; give another file name",
            "--checkpoint", workdir, "--video", copy, "--save-hht", same,
        )  # fmt: skip
    (tmp_path / "sub").rmdir()
    assert copy.read_bytes() == sign_sample.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_cli_missing_video(workdir, tmp_path, capsys):
    missing = tmp_path / "clip.mp4"
    _expect_error(
        capsys, f"video {missing} does not exist", "--checkpoint", workdir, "--video", missing
    )


def test_cli_unreadable_video(workdir, tmp_path, capsys):
    bad = tmp_path / "clip.mp4"
    bad.write_text("not a video\n")
    _expect_error(capsys, f"{bad}: cannot decode as video", "--checkpoint", workdir, "--video", bad)


def test_cli_save_hht_into_missing_folder(workdir, sign_sample, tmp_path, capsys):
    target = tmp_path / "no" / "out.mp4"
    _expect_error(
        capsys, f"folder {target.parent} does not exist", "--checkpoint", workdir,
        "--video", sign_sample, "--save-hht", target,
    )  # fmt: skip
    assert not (tmp_path / "no").exists()


def test_cli_incomplete_models_folder(workdir, sign_sample, shared_dir, tmp_path, capsys):
    _expect_error(
        capsys, f"--models {tmp_path} lacks", "--checkpoint", workdir, "--video", sign_sample,
        "--models", tmp_path,
    )  # fmt: skip
    import shutil

    models = tmp_path / "models"
    shutil.copytree(shared_dir / "mediapipe_models", models)
    (models / "pose_landmarker_full.task").write_text("<html>quota exceeded</html>")
    _expect_error(
        capsys, f"{models / 'pose_landmarker_full.task'}: not a MediaPipe .task bundle",
        "--checkpoint", workdir, "--video", sign_sample, "--models", models,
    )  # fmt: skip


def test_cli_bad_options(workdir, sign_sample, capsys):
    for option in (["--top-k", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            predict.main(["--checkpoint", str(workdir), "--video", str(sign_sample), *option])
        assert e.value.code == 2
        assert f"{option[0]} must be >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def empty_scene(tmp_path_factory):
    """A short video of a smooth colour ramp: nobody in it."""
    path = tmp_path_factory.mktemp("scene") / "empty.mp4"
    ramp = np.linspace(40, 200, 96).astype(np.uint8)
    frame = np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1)
    write_video(path, [frame] * 10, 25.0)
    return path


def test_cli_no_person_warns_and_still_predicts(workdir, empty_scene, capsys):
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", empty_scene, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["warnings"]) == 1 and "no head or hand found" in report["warnings"][0]
    assert "warning: " in err and "no head or hand found" in err
    assert all(c["located"] == 0 for c in report["hht"]["coverage"].values())
    assert len(report["top_k"]) == 5


def test_cli_still_image_is_predicted_with_a_warning(workdir, sign_sample, tmp_path, capsys):
    import cv2

    frame = read_video(sign_sample)[0][30]
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", still, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["hht"]["frames"] == 1
    assert any("has a single frame (a still image?)" in w for w in report["warnings"])


def test_cli_no_person_and_no_whole_frame_cell_is_an_error(
    tmp_path, empty_scene, sign_sample, capsys
):
    hht = HHTSettings(size=64, quadrants=(False, True, True, True)).to_dict()
    ckpt = _save_tiny(tmp_path / "ckpt", hht=hht)
    _expect_error(
        capsys, f"{empty_scene}: no head or hand found in any frame, and the checkpoint's H&HT "
        "layout has no whole-frame cell", "--checkpoint", ckpt, "--video", empty_scene,
    )  # fmt: skip
    # other warnings (here a high frame rate) are not taken for a missing person
    fast = tmp_path / "fast.mp4"
    write_video(fast, np.repeat(read_video(sign_sample)[0], 2, axis=0), 50.0)
    code, out, err = _cli(capsys, "--checkpoint", ckpt, "--video", fast, "--json")
    assert code == 0, err
    assert [w.split(" runs at ")[1][:6] for w in json.loads(out)["warnings"]] == ["50 fps"]


@pytest.mark.heavy
def test_one_device_process_predicts_with_an_eight_device_run(smoke_workdir, sign_sample):
    # The smoke run trained on this process's 8 simulated devices; a fresh process (one CPU
    # device, like a laptop after training on a TPU's cores) must still predict with it.
    import subprocess
    import sys

    run = smoke_workdir / "workdir"
    proc = subprocess.run(
        [sys.executable, "-m", "signnet_jax.predict", "--checkpoint", str(run),
         "--video", str(sign_sample), "--json", "--top-k", "1"],
        capture_output=True, text=True, check=False, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    with predict.Predictor(run) as p:  # this process: the 8 devices the run trained on
        here = p.run(sign_sample, top_k=1).report
    assert jax.device_count() == 8 and (report["step"], here["step"]) == (3, 3)
    [(top, expected)] = zip(report["top_k"], here["top_k"], strict=True)
    assert (top["label"], top["gloss"]) == (expected["label"], expected["gloss"])
    assert top["probability"] == pytest.approx(expected["probability"], abs=1e-6)


def test_cli_frame_span_and_long_video_warning(workdir, sign_sample, tmp_path, capsys):
    frames = read_video(sign_sample)[0]
    long = tmp_path / "long.mp4"
    write_video(long, np.concatenate([frames] * 4), 25.0)  # 304 frames, 12 s
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", long, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["hht"]["frames"] == 304
    assert report["warnings"] == [
        f"{long}: 304 frames (12 s), but each of the 2 clips the model sees covers 12 frames, "
        "so most of the video is not seen; trim it to one sign (--start-frame and --end-frame)"
    ]
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", long, "--json", "--start-frame", "76",
        "--end-frame", "152",
    )  # fmt: skip
    assert code == 0, err
    trimmed = json.loads(out)
    assert trimmed["hht"]["frames"] == 76 and trimmed["warnings"] == []
    assert (trimmed["source"]["start_frame"], trimmed["source"]["end_frame"]) == (76, 152)
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--checkpoint", workdir, "--video", long, "--start-frame", "9",
             "--end-frame", "9")  # fmt: skip
    assert e.value.code == 2
    assert "--start-frame 9 and --end-frame 9: the first frame must be >= 0 and before the end" \
        in capsys.readouterr().err  # fmt: skip


def test_resample_keeps_the_frame_shown_at_each_tick():
    frames = np.arange(7)
    # 60 fps to 30: every other frame
    got, ticks = predict.resample(frames, np.arange(7) / 60, 30)
    np.testing.assert_array_equal(got, [0, 2, 4, 6])
    np.testing.assert_allclose(ticks, [0, 1 / 30, 2 / 30, 3 / 30])
    # variable frame rate: the latest frame shown at 0, 0.1 and 0.2 s
    got, _ = predict.resample(frames[:4], np.array([0.0, 0.04, 0.12, 0.2]), 10)
    np.testing.assert_array_equal(got, [0, 1, 3])


def test_cli_high_frame_rate_warns_and_fps_resamples(workdir, sign_sample, tmp_path, capsys):
    frames = read_video(sign_sample)[0]
    fast = tmp_path / "fast.mp4"
    write_video(fast, np.repeat(frames, 2, axis=0), 50.0)  # the same sign recorded at 50 fps
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", fast, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["hht"]["frames"] == 152 and report["hht"]["fps"] == 50.0
    assert report["warnings"] == [
        f"{fast} runs at 50 fps; the published models were trained on videos of about 25-30 "
        "fps, so each clip covers a shorter stretch of the sign than in training; try --fps 30"
    ]
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", fast, "--json", "--fps", "25")
    assert code == 0, err
    report = json.loads(out)
    assert report["hht"]["frames"] == 76 and report["hht"]["fps"] == 25.0
    assert report["warnings"] == []
    assert report["source"]["frames"] == 152 and report["source"]["resampled_to_fps"] == 25.0
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", fast, "--json", "--fps", "60")
    assert code == 0, err
    report = json.loads(out)
    # ticks every 1/60 s up to the last frame at 151/50 s: floor(181.2) + 1
    assert report["hht"]["frames"] == 182 and report["source"]["resampled_to_fps"] == 60.0
    assert report["notes"][-1] == (
        "--fps 60 is above the video's 50 fps: frames are repeated (182 from 152)"
    )
    # the text report names the file as it is, then what --fps made of it
    assert predict.format_report(report).splitlines()[0] == (
        f"{fast}: 152 frames, 50 fps, 256x256 (resampled to 60 fps: 182 frames)"
    )
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--checkpoint", workdir, "--video", fast, "--fps", "0")
    assert e.value.code == 2 and "--fps must be > 0, got 0.0" in capsys.readouterr().err


def test_frame_rate_warning_uses_the_training_videos_rate():
    # not recorded: a rate above HIGH_FPS (40) or below LOW_FPS (16) is named
    assert predict.frame_rate_warning("v.mp4", 40, None) is None
    assert predict.frame_rate_warning("v.mp4", 16, None) is None
    assert predict.frame_rate_warning("v.mp4", 50, None) == (
        "v.mp4 runs at 50 fps; the published models were trained on videos of about 25-30 fps, "
        "so each clip covers a shorter stretch of the sign than in training; try --fps 30"
    )
    assert predict.frame_rate_warning("v.mp4", 15.6, None) == (
        "v.mp4 runs at 15.6 fps; the published models were trained on videos of about 25-30 "
        "fps, so each clip covers a longer stretch of the sign than in training; try --fps 25 "
        "(repeats frames)"
    )
    # recorded 25 fps: warned above 37.5 and below 16.67 fps, each with the fix
    assert predict.frame_rate_warning("v.mp4", 37.5, 25.0) is None
    assert predict.frame_rate_warning("v.mp4", 50 / 3, 25.0) is None
    assert predict.frame_rate_warning("v.mp4", 38, 25.0) == (
        "v.mp4 runs at 38 fps; this model was trained on videos of 25 fps (median), so each "
        "clip covers a shorter stretch of the sign than in training; try --fps 25"
    )
    assert predict.frame_rate_warning("v.mp4", 12.5, 25.0) == (
        "v.mp4 runs at 12.5 fps; this model was trained on videos of 25 fps (median), so each "
        "clip covers a longer stretch of the sign than in training; try --fps 25 (repeats frames)"
    )
    # a 60 fps model (recorded) takes a 60 fps video as it is
    assert predict.frame_rate_warning("v.mp4", 60, 60.0) is None


def test_cli_low_frame_rate_warns_by_the_checkpoints_training_rate(sign_sample, tmp_path, capsys):
    ckpt = _save_tiny(tmp_path / "ckpt", train_fps=25.0)
    slow = tmp_path / "slow.mp4"
    write_video(slow, read_video(sign_sample)[0][::2], 12.5)  # the sign at half the rate
    code, out, err = _cli(capsys, "--checkpoint", ckpt, "--video", slow, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["views"]["train_fps"] == 25.0
    assert report["warnings"] == [predict.frame_rate_warning(str(slow), 12.5, 25.0)]
    code, out, err = _cli(capsys, "--checkpoint", ckpt, "--video", slow, "--json", "--fps", "25")
    assert code == 0, err
    report = json.loads(out)
    # 38 frames at 0.08 s steps, shown at 0.04 s ticks up to 2.96 s: each twice but the last
    assert report["hht"]["frames"] == 75 and report["warnings"] == []
    assert report["notes"][-1] == (
        "--fps 25 is above the video's 12.5 fps: frames are repeated (75 from 38)"
    )


def _figure_texts(fig):
    import matplotlib.text

    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def test_cli_preview_picture(workdir, sign_sample, tmp_path, capsys):
    png = tmp_path / "clip.png"
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", sign_sample, "--preview", png, "--json",
        "--top-k", "3",
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {png}" in err
    report = json.loads(out)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] == 1000  # 10 in at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.png"]  # no temporaries
    # what it shows: the glosses ranked as in the report, and no warnings for this video
    with predict.Predictor(workdir) as p:
        fig = predict.preview_figure(p.run(sign_sample, top_k=3))
    texts = _figure_texts(fig)
    bars = fig.subfigs[1].axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == [t["gloss"] for t in report["top_k"]]
    assert [b.get_width() for b in bars.patches] == [t["probability"] for t in report["top_k"]]
    assert "top 3 of 7 glosses, checkpoint step 0" in texts
    assert not any(t.startswith("warning: ") for t in texts)


def test_preview_shows_the_warnings(workdir, sign_sample, tmp_path):
    fast = tmp_path / "fast.mp4"
    write_video(fast, np.repeat(read_video(sign_sample)[0], 2, axis=0), 50.0)
    with predict.Predictor(workdir) as p:
        run, resampled = p.run(fast), p.run(fast, fps=25)
    fig = predict.preview_figure(run)
    assert len(fig.subfigs) == 3
    (shown,) = [t for t in _figure_texts(fig) if t.startswith("warning: ")]
    assert " ".join(shown.split()) == f"warning: {run.report['warnings'][0]}"
    # resampled: no warning, and the title says the frames are counted after resampling
    assert resampled.report["warnings"] == []
    fig = predict.preview_figure(resampled)
    assert len(fig.subfigs) == 2
    assert any("76 frames (25 fps after resampling)" in t for t in _figure_texts(fig))


def test_cli_preview_that_cannot_be_written_stops_first(sign_sample, tmp_path, capsys):
    # checked before the checkpoint is even read: a missing one is not what is reported
    missing = tmp_path / "no_checkpoint"
    for extra, message in [
        (["--preview", tmp_path / "out.jpg"], f"--preview {tmp_path / 'out.jpg'} must end in .png"),
        (["--preview", "/proc/out.png"], "cannot write --preview /proc/out.png: "),
        (["--preview", tmp_path / "no" / "out.png"], f"folder {tmp_path / 'no'} does not exist"),
    ]:
        _expect_error(capsys, message, "--checkpoint", missing, "--video", sign_sample, *extra)
    assert list(tmp_path.iterdir()) == []


def test_cli_preview_failing_after_the_work_leaves_no_outputs(
    workdir, sign_sample, tmp_path, capsys, monkeypatch
):
    # the preview's place passed the early check, then the write fails (a full disk): the
    # video is reported failed and its tunnelled video, already written, is removed again
    def full_disk(path, prediction, top=5):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict, "write_preview", full_disk)
    out_mp4, out_png = tmp_path / "clip_hht.mp4", tmp_path / "clip.png"
    _expect_error(
        capsys, f"cannot write --preview {out_png}: [Errno 28] No space left on device",
        "--checkpoint", workdir, "--video", sign_sample, "--save-hht", out_mp4,
        "--preview", out_png,
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_cli_several_videos_share_one_load(workdir, sign_sample, tiny_run, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.MOV"):  # a folder's videos are found by suffix, any case
        (videos / name).write_bytes(sign_sample.read_bytes())
    (videos / "c.mp4").write_text("not a video\n")
    (videos / "notes.txt").write_text("not looked at\n")
    (videos / "sub").mkdir()  # not looked into
    (videos / "sub" / "d.mp4").write_bytes(b"")
    (videos / ".DS_Store").write_bytes(b"")  # hidden files go unmentioned
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", videos, videos / "a.mp4", "--json",
        "--save-hht", out_dir, "--preview", out_dir,
    )  # fmt: skip
    # the bad video fails alone, is named and has its line; the others are predicted
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["video"] for r in lines] == [str(videos / n) for n in ("a.mp4", "b.MOV", "c.mp4")]
    assert lines[2] == {
        "video": str(videos / "c.mp4"),
        "error": f"{videos / 'c.mp4'}: cannot decode as video (Invalid data found when "
        "processing input)",
    }
    # the same frames give the same probabilities as a run of that video alone
    for r in lines[:2]:
        assert r["top_k"] == tiny_run.report["top_k"][:5]
    assert "load" in lines[0]["timings_ms"] and "load" not in lines[1]["timings_ms"]
    # what the folder holds besides its videos is named, not passed over in silence
    assert err.splitlines()[0] == (
        f"note: skipping 2 entries of the --video folders that are not video files by their "
        f"names ({videos / 'notes.txt'}, {videos / 'sub'}/); give a file itself to predict it"
    )
    assert err.splitlines()[1] == f"[1/3] {videos / 'a.mp4'}"
    assert err.splitlines()[-1] == f"predicted 2 of 3 videos; failed: {videos / 'c.mp4'}"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "a_hht.mp4", "a_preview.png", "b_hht.mp4", "b_preview.png",
    ]  # fmt: skip
    # text mode: one report a video, after a blank line
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", videos / "a.mp4",
                          videos / "b.MOV")  # fmt: skip
    assert code == 0, err
    assert out.count(f"checkpoint {workdir / 'checkpoints'} (step 0)") == 2
    assert out.startswith("\n" + str(videos / "a.mp4"))
    # a folder that holds one video is still a folder: one JSON line and the count
    single = tmp_path / "single"
    single.mkdir()
    (single / "a.mp4").write_bytes(sign_sample.read_bytes())
    code, out, err = _cli(capsys, "--checkpoint", workdir, "--video", single, "--json")
    assert code == 0, err
    (line,) = out.splitlines()
    assert json.loads(line)["top_k"] == tiny_run.report["top_k"][:5]
    assert err.splitlines()[0] == f"[1/1] {single / 'a.mp4'}"
    assert err.splitlines()[-1] == "predicted 1 of 1 videos"


def test_a_folder_s_videos_by_their_names(tmp_path):
    names = ["a.MTS", "b.m2ts", "c.ogv", "d.mp4", "e.txt", ".hidden.mp4x"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    skipped = []
    found = predict.find_videos([tmp_path, tmp_path / "e.txt"], skipped)
    assert found == [str(tmp_path / n) for n in ("a.MTS", "b.m2ts", "c.ogv", "d.mp4", "e.txt")]
    assert skipped == [str(tmp_path / "sub") + "/"]  # e.txt is given as a file as well
    assert predict.find_videos([tmp_path]) == found[:4]
    skipped = []  # a folder given twice: its entries named once
    assert predict.find_videos([tmp_path, tmp_path], skipped) == found[:4]
    assert skipped == [str(tmp_path / "e.txt"), str(tmp_path / "sub") + "/"]


def test_cli_several_videos_bad_options_stop_before_loading(sign_sample, tmp_path, capsys):
    missing = tmp_path / "no_checkpoint"  # never reached: each error below comes first
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "clip.mp4").write_bytes(sign_sample.read_bytes())
    two = [tmp_path / "x" / "clip.mp4", tmp_path / "y" / "clip.mp4"]
    for extra, message in [
        (["--start-frame", "3"], "--start-frame/--end-frame cut one video, but 2 videos are given"),
        (["--save-hht", tmp_path / "o.mp4"], f"--save-hht {tmp_path / 'o.mp4'} is a file name, "
         "but 2 videos are given; give an existing folder"),
        (["--preview", tmp_path], f"--preview {tmp_path}: videos {two[0]} and {two[1]} would "
         "both write clip_preview.png"),
        ([tmp_path / "nope.mp4"], f"video {tmp_path / 'nope.mp4'} does not exist"),
        (["--preview", f"{tmp_path / 'new'}/"], f"--preview {tmp_path / 'new'}/: folder does "
         "not exist; create it first"),
    ]:  # fmt: skip
        _expect_error(capsys, message, "--checkpoint", missing, "--video", *two, *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "y"]


def test_cli_outputs_never_replace_another_input_video(workdir, sign_sample, tmp_path, capsys):
    # A second run over a folder that also receives the --save-hht files: a_hht.mp4 (a video
    # of the run) would be overwritten by a.mp4's output before it is read.
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(sign_sample.read_bytes())
    mine = sign_sample.read_bytes()[::-1]  # the user's own file that happens to be named so
    (videos / "a_hht.mp4").write_bytes(mine)
    missing = tmp_path / "no_checkpoint"  # refused before the checkpoint is read
    _expect_error(
        capsys, f"--save-hht {videos / 'a_hht.mp4'} would replace the input video "
        f"{videos / 'a_hht.mp4'}", "--checkpoint", missing, "--video", videos, "--save-hht", videos,
    )  # fmt: skip
    assert (videos / "a_hht.mp4").read_bytes() == mine
    assert sorted(p.name for p in videos.iterdir()) == ["a.mp4", "a_hht.mp4"]


def test_cli_video_flag_given_twice_keeps_both(workdir, sign_sample, tmp_path, capsys):
    other = tmp_path / "other.mp4"
    other.write_bytes(sign_sample.read_bytes())
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", sign_sample, "--video", other, "--json"
    )
    assert code == 0, err
    videos = [json.loads(line)["video"] for line in out.splitlines()]
    assert videos == [str(sign_sample), str(other)]


def test_cli_reports_the_video_path_as_given(workdir, sign_sample, tmp_path, capsys, monkeypatch):
    # one video: the report and 'wrote' lines name the paths as typed, as before several videos
    (tmp_path / "clip.mp4").write_bytes(sign_sample.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", "./clip.mp4", "--json", "--save-hht",
        "./clip_hht.mp4",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["video"] == "./clip.mp4"
    assert "wrote ./clip_hht.mp4" in err.splitlines()


def test_preview_draws_names_with_dollar_signs_as_text(workdir, sign_sample, tmp_path):
    # '$...$' would be parsed as mathtext: a file name like 'price $5_$6.mp4' raised ValueError
    # in savefig, which ended a run of several videos with a traceback
    video = tmp_path / "price $5_$6.mp4"
    video.write_bytes(sign_sample.read_bytes())
    with predict.Predictor(workdir) as p:
        p.classes = ["$x_$"] + p.classes[1:]
        run = p.run(video, top_k=len(p.classes))
    png = tmp_path / "preview.png"
    predict.write_preview(png, run, top=len(p.classes))
    assert cv2.imread(str(png)) is not None
    texts = _figure_texts(predict.preview_figure(run, top=len(p.classes)))
    assert any(t.startswith("price $5_$6.mp4: ") for t in texts) and "$x_$" in texts


def test_cli_ctrl_c_is_one_line_and_leaves_no_outputs_of_the_video(
    workdir, sign_sample, tmp_path, capsys, monkeypatch
):
    # Ctrl-C as soon as the preview is written: the video's outputs go again
    write_preview = predict.write_preview

    def then_ctrl_c(path, prediction, top=5):
        write_preview(path, prediction, top)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.png", "clip_hht.mp4"]
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "write_preview", then_ctrl_c)
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", sign_sample, "--save-hht",
        tmp_path / "clip_hht.mp4", "--preview", tmp_path / "clip.png",
    )  # fmt: skip
    assert (code, out) == (130, "")
    assert err == "interrupted: no video predicted; no --save-hht/--preview file written\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_ctrl_c_after_some_videos_keeps_theirs(
    workdir, sign_sample, tmp_path, capsys, monkeypatch
):
    videos, out_dir = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    out_dir.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (videos / name).write_bytes(sign_sample.read_bytes())
    run, calls = predict.Predictor.run, []

    def run_then_ctrl_c(self, *args, **kwargs):  # Ctrl-C once b's tunnelled video is written
        calls.append(args[0])
        prediction = run(self, *args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prediction

    monkeypatch.setattr(predict.Predictor, "run", run_then_ctrl_c)
    code, out, err = _cli(
        capsys, "--checkpoint", workdir, "--video", videos, "--json", "--save-hht", out_dir
    )
    assert code == 130
    assert [json.loads(line)["video"] for line in out.splitlines()] == [str(videos / "a.mp4")]
    assert err.splitlines()[-1] == (
        "interrupted: 1 of 3 videos predicted (reported above); no --save-hht file written for "
        "the others"
    )
    assert [p.name for p in out_dir.iterdir()] == ["a_hht.mp4"]
