"""python -m data_prep.hht: outputs, summary, and every bad input of issue 3."""

import os
import pathlib
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import hht as cli
from signnet_jax.hht import read_video, write_video
from tests.helpers import interrupt_after

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(capsys, *args):
    code = cli.main([*map(str, args), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sample_run(sign_sample, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cli")
    out, preview = out_dir / "nested" / "out.mp4", out_dir / "sheet.png"
    code = cli.main(
        ["--video", str(sign_sample), "--output", str(out), "--preview", str(preview), "--quiet"]
    )
    return code, out, preview


def test_writes_video_and_contact_sheet(sample_run):
    code, out, preview = sample_run
    assert code == 0
    frames, fps = read_video(out)
    assert frames.shape == (76, 256, 256, 3) and fps == 25.0
    sheet = cv2.imread(str(preview))
    # 6 tiles, 2 per row; a tile is source (256) + gap (4) + tunnelled (256) + gap (4),
    # over a 20-pixel caption strip
    assert sheet.shape == (3 * (256 + 20), 2 * (256 + 4 + 256 + 4), 3)
    assert sorted(os.listdir(out.parent)) == ["out.mp4"]


def test_prints_a_coverage_summary(sign_sample, tmp_path, capsys):
    code, out, _ = run(capsys, "--video", sign_sample, "--output", tmp_path / "o.mp4")
    assert code == 0
    assert "coverage of 76 frames:" in out
    head = re.search(r"^\s+head\s+(\d+) \((\d+)%\)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    assert head and int(head.group(1)) >= 73 and int(head.group(3)) >= 72
    right = re.search(r"^\s+right hand\s+(\d+) \(\d+%\)\s+(\d+)\s+(\d+)", out, re.M)
    assert right and int(right.group(1)) >= 34 and int(right.group(3)) >= 30  # pose fallback
    stages = r"ms/frame: decode [\d.]+, prepare [\d.]+, pose [\d.]+, hands [\d.]+, face [\d.]+"
    assert re.search(stages, out)


def test_layout_size_and_mask_options(sign_sample, tmp_path, capsys):
    out = tmp_path / "strip.mp4"
    code, _, _ = run(
        capsys, "--video", sign_sample, "--output", out, "--layout", "strip", "--size", "128",
        "--quadrants", "1,0,1,1", "--end-frame", "10",
    )  # fmt: skip
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape == (10, 128, 128, 3)
    # strip at 128: frame on top (86 rows), then head | right | left cells of 42-43 px
    assert frames[:, 90:, :40].max() < 20  # head switched off
    assert frames[:, 20:60].mean() > 40  # whole frame present


@pytest.mark.parametrize(
    "kind, cause",
    [
        ("not_a_video", "cannot decode as video (Invalid data found when processing input)\n"),
        ("zero_frames", "zero decodable video frames\n"),
        ("unreadable_codec", "cannot decode as video (Decoder not found)\n"),
    ],
)
def test_bad_inputs_fail_cleanly(kind, cause, sign_sample, tmp_path, capsys):
    if kind == "not_a_video":
        video = tmp_path / "clip.mp4"
        video.write_text("hello\n" * 50)
    elif kind == "zero_frames":
        video = tmp_path / "clip.y4m"
        video.write_bytes(b"YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\n")
    else:
        data = bytearray(sign_sample.read_bytes())
        data[data.find(b"esds") + 21] = 0xC0  # private codec id
        video = tmp_path / "clip.mp4"
        video.write_bytes(bytes(data).replace(b"mp4v", b"zzzz"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    new = out_dir / "new"  # the folders made for the outputs go again
    code, _, err = run(
        capsys, "--video", video, "--output", new / "hht" / "o.mp4", "--preview", new / "o.png"
    )
    assert code == 1
    assert err == f"error: {video}: {cause}"
    assert os.listdir(out_dir) == []


def test_noise_video_is_written_with_a_warning(tmp_path, capsys):
    video = tmp_path / "noise.mp4"
    rng = np.random.default_rng(1)
    write_video(video, rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8), 25)
    code, out, err = run(capsys, "--video", video, "--output", tmp_path / "o.mp4")
    assert code == 0
    assert f"warning: {video}: no head or hand found in any of 10 frames" in err
    assert re.search(r"^\s+head\s+0 \(0%\)", out, re.M)
    frames, _ = read_video(tmp_path / "o.mp4")
    assert frames.shape == (10, 256, 256, 3)
    assert frames[:, :128, :128].mean() > 60 and frames[:, 128:].max() < 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quadrants", "11x1"], "--quadrants takes four 0/1 flags"),
        (
            ["--quadrants", "0000"],
            "error: --quadrants are all off, which makes every frame black; switch on at least "
            "one of frame, head, right_hand, left_hand\n",
        ),
        (["--size", "255"], "error: --size must be an even integer >= 16, got 255\n"),
        (["--output", "o.avi"], "must end in .mp4"),
        (
            ["--min-confidence", "2", "--detect-size", "-1"],
            "error: --min-confidence must be in [0, 1], got 2.0; --detect-size must be an "
            "integer >= 0, got -1\n",
        ),
        (["--start-frame", "-5"], "--start-frame -5: the first frame must be >= 0"),
        (["--start-frame", "50", "--end-frame", "10"], "must be >= 0 and before --end-frame"),
    ],
)
def test_bad_options_exit_2(args, message, sign_sample, tmp_path, capsys):
    argv = ["--video", sign_sample, "--output", tmp_path / "o.mp4", *args]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "o.mp4").exists()


def test_incomplete_models_dir_is_named(sign_sample, tmp_path, capsys):
    code, _, err = run(
        capsys, "--video", sign_sample, "--output", tmp_path / "o.mp4", "--models", tmp_path
    )
    assert code == 1 and f"--models {tmp_path} lacks" in err


def test_unusable_model_files_are_named(shared_dir, sign_sample, tmp_path, capsys):
    import shutil
    import zipfile

    models = tmp_path / "models"
    shutil.copytree(shared_dir / "mediapipe_models", models)
    out = tmp_path / "o.mp4"
    # not a zip at all: caught by the structure check before MediaPipe sees it
    (models / "hand_landmarker.task").write_text("<html>quota exceeded</html>")
    code, _, err = run(capsys, "--video", sign_sample, "--output", out, "--models", models)
    assert code == 1 and "Traceback" not in err
    assert f"{models / 'hand_landmarker.task'}: not a MediaPipe .task bundle" in err
    assert "replace it with the official file (https://" in err
    # the right members with broken contents: MediaPipe's own error, with the file named
    with zipfile.ZipFile(models / "hand_landmarker.task", "w") as z:
        z.writestr("hand_detector.tflite", b"broken")
        z.writestr("hand_landmarks_detector.tflite", b"broken")
    code, _, err = run(capsys, "--video", sign_sample, "--output", out, "--models", models)
    assert code == 1 and "Traceback" not in err
    assert f"{models / 'hand_landmarker.task'}: MediaPipe cannot load this model (" in err
    assert not out.exists()


def test_module_entry_point_exit_status(tmp_path):
    video = tmp_path / "bad.mp4"
    video.write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.hht", "--video", str(video), "--output",
         str(tmp_path / "o.mp4"), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"error: {video}: cannot decode as video" in proc.stderr
    assert not (tmp_path / "o.mp4").exists()


# MediaPipe's native log lines as mediapipe 1.2.3 writes them to fd 2: glog/absl
# ("W0000 00:00:1795616517.983914   14299 file.cc:1433] ..."), LiteRT / TensorFlow Lite
# ("INFO: [environment.cc:36] ...", "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
# "WARNING: [model_load.cc:402] Sparsity tensors ...").
NATIVE_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ |(INFO|WARNING|ERROR): )", re.M)


@pytest.mark.parametrize("logs", ["quiet", "SIGNNET_MEDIAPIPE_LOGS=1"])
def test_native_mediapipe_logs_are_off_stderr_unless_asked_for(logs, sign_sample, tmp_path):
    out = tmp_path / "o.mp4"
    env = {**os.environ, "SIGNNET_MEDIAPIPE_LOGS": "1" if logs != "quiet" else ""}
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.hht", "--video", str(sign_sample), "--output",
         str(out), "--end-frame", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_video(out)[0].shape == (5, 256, 256, 3)
    assert "wrote " in proc.stdout
    assert "detecting" in proc.stderr  # Python's own stderr (the progress bar) still shows
    native = NATIVE_LOG.findall(proc.stderr)
    if logs == "quiet":
        assert native == [], proc.stderr
    else:  # creation, first detection and closing all log
        assert len(native) >= 20
        for line in ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "W0000 "):
            assert line in proc.stderr
        assert "DestroyAccelerator" in proc.stderr


def test_progress_into_a_log_file_is_a_line_not_a_redrawn_bar(sign_sample, tmp_path):
    log = tmp_path / "hht.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "data_prep.hht", "--video", str(sign_sample), "--output",
             str(tmp_path / "o.mp4"), "--end-frame", "5"],
            cwd=REPO, stderr=f, stdout=subprocess.PIPE, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"},
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    # the work is shorter than the interval between lines: only the last line
    progress = [line for line in text.splitlines() if line.startswith("detecting")]
    assert len(progress) == 1, text
    assert re.fullmatch(
        r"detecting: 5/5 frames \(100%\), (\d+\.\d\d frames/s|\d+\.\d s/frame), 00:0\d so far",
        progress[0],
    )


def test_outputs_that_cannot_be_written_stop_before_the_work(sign_sample, tmp_path, capsys):
    (tmp_path / "taken.mp4").mkdir()
    for flag, target, message, fix in [
        ("--output", tmp_path / "taken.mp4", f"--output {tmp_path / 'taken.mp4'} is a folder",
         "; give a file name"),
        # the reason between is the system's (here: no such file in /proc)
        ("--output", "/proc/o.mp4", "cannot write --output /proc/o.mp4: ",
         "; choose a folder you can write to"),
        ("--preview", "/proc/o.png", "cannot write --preview /proc/o.png: ",
         "; choose a folder you can write to"),
    ]:  # fmt: skip
        argv = ["--video", sign_sample, "--output", tmp_path / "o.mp4", flag, target]
        code, out, err = run(capsys, *argv)
        assert code == 1 and err.startswith(f"error: {message}"), err
        assert err.endswith(f"{fix}\n") and err.count("\n") == 1, err
        assert "ms/frame" not in out  # nothing was tunnelled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]
    # the input itself, also reached through a link
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(sign_sample.read_bytes())
    (tmp_path / "link").symlink_to(tmp_path)
    for same in (clip, tmp_path / "link" / "clip.mp4"):
        code, _, err = run(capsys, "--video", clip, "--output", same)
        assert (code, err) == (
            1,
            f"error: --output {same} is the input video; give another file name\n",
        )
    assert clip.read_bytes() == sign_sample.read_bytes()


def test_a_preview_that_is_not_a_png_exits_2(sign_sample, tmp_path, capsys):
    sheet = tmp_path / "sheet.jpg"
    argv = ["--video", sign_sample, "--output", tmp_path / "o.mp4", "--preview", sheet]
    assert run(capsys, *argv) == (2, "", f"error: --preview {sheet} must end in .png\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_made_stops_before_the_work(sign_sample, tmp_path, capsys):
    for flag, target in [("--output", "/proc/x/o.mp4"), ("--preview", "/proc/x/p.png")]:
        argv = ["--video", sign_sample, "--output", tmp_path / "o.mp4", flag, target]
        assert run(capsys, *argv) == (
            1,
            "",
            f"error: cannot create the folder of {flag} {target}: /proc: No such file or "
            "directory; choose a folder you can write to\n",
        )
    assert list(tmp_path.iterdir()) == []
    # the --output folder is not made when the --preview one cannot be
    argv = ["--video", sign_sample, "--output", tmp_path / "new" / "o.mp4"]
    assert run(capsys, *argv, "--preview", "/proc/x/p.png")[0] == 1
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_is_one_line_naming_the_file(sign_sample, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    def full(path, frames, fps):  # as PyAV raises it: naming the temporary file
        raise OSError(28, "No space left on device", str(path.parent / f".{path.name}.x.part"))

    monkeypatch.setattr(cli, "write_video", full)
    out = tmp_path / "o.mp4"
    argv = ["--video", sign_sample, "--output", out, "--start-frame", 30, "--end-frame", 34]
    assert run(capsys, *argv) == (
        1, "", f"error: cannot write {out}: No space left on device\n"
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_models_folder_that_does_not_exist_is_named_before_any_progress(
    sign_sample, tmp_path, capsys
):
    for models, message in [
        (tmp_path / "nonexistent", f"--models {tmp_path / 'nonexistent'}: no such folder; "),
        (tmp_path, f"--models {tmp_path} lacks hand_landmarker.task"),  # exists, incomplete
    ]:
        # no --quiet: the progress bar is on, and must not start before the models load
        argv = ["--video", sign_sample, "--output", tmp_path / "o.mp4", "--models", models]
        code = cli.main(list(map(str, argv)))
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"error: {message}"), err
        assert "detecting" not in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(
    "target, left",
    [
        ("signnet_jax.hht:Tunneller.process_frames", "nothing written at {out} or {preview}"),
        ("data_prep.hht:write_video", "wrote {out}, not {preview}"),
    ],
)
def test_ctrl_c_is_one_line_saying_what_was_written(target, left, sign_sample, tmp_path):
    out, preview = tmp_path / "new" / "o.mp4", tmp_path / "sheet.png"  # new/: made by the run
    r = interrupt_after(
        target, "data_prep.hht:main", "--video", sign_sample, "--output", out, "--preview",
        preview, "--quiet",
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (130, "")
    assert r.stderr == f"interrupted: {left.format(out=out, preview=preview)}\n"
    assert [p.name for p in tmp_path.iterdir()] == (["new"] if "wrote" in left else [])
    assert "wrote" not in left or [p.name for p in out.parent.iterdir()] == ["o.mp4"]
