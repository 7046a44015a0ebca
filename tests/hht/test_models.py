"""Model lookup order and the (faked, offline) one-time download."""

import os
import shutil
import urllib.request

import pytest

from signnet_jax.hht import find_models
from signnet_jax.hht.models import ENV_VAR, MODEL_URLS, check_model_file

NAMES = sorted(MODEL_URLS)


@pytest.fixture
def stand_ins(shared_dir):
    return shared_dir / "mediapipe_models"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """No folder named anywhere: the cache under $XDG_CACHE_HOME is used."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "signnet_jax" / "mediapipe"


def fake_download(stand_ins, calls):
    def retrieve(url, target):
        calls.append(url)
        shutil.copyfile(stand_ins / url.rsplit("/", 1)[1], target)

    return retrieve


def test_stand_ins_pass_the_file_checks(stand_ins):
    for name in NAMES:
        check_model_file(stand_ins / name)


def test_models_dir_beats_the_environment(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert find_models(stand_ins) == stand_ins
    monkeypatch.setenv(ENV_VAR, str(stand_ins))
    assert find_models(None) == stand_ins


def test_incomplete_folder_names_what_is_missing(stand_ins, tmp_path, monkeypatch):
    shutil.copy(stand_ins / "hand_landmarker.task", tmp_path)
    lacking = (
        f"{tmp_path} lacks pose_landmarker_full.task, blaze_face_short_range.tflite; "
        f"put MediaPipe's official files there ({MODEL_URLS['pose_landmarker_full.task']}, "
        f"{MODEL_URLS['blaze_face_short_range.tflite']}), or "
    )
    with pytest.raises(FileNotFoundError) as e:
        find_models(tmp_path)
    assert str(e.value) == f"--models {lacking}leave it out to use the download cache"
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        find_models(None)
    assert str(e.value) == f"${ENV_VAR} {lacking}unset it to use the download cache"


def test_empty_cache_without_download_says_what_to_do(cache):
    with pytest.raises(FileNotFoundError, match=f"pass --models DIR or set {ENV_VAR}"):
        find_models(download=False)


def test_one_time_download_into_the_cache(cache, stand_ins, monkeypatch):
    calls = []
    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download(stand_ins, calls))
    assert find_models() == cache
    assert sorted(calls) == sorted(MODEL_URLS.values())
    assert all(u.startswith("https://storage.googleapis.com/mediapipe-models/") for u in calls)
    assert sorted(p.name for p in cache.iterdir()) == sorted([*NAMES, "signnet_models.json"])
    # second time: served from the cache, no download
    assert find_models() == cache
    assert len(calls) == 3
    # a cached file that changed is caught by the recorded hash
    with open(cache / "hand_landmarker.task", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="hand_landmarker.task changed since it was downloaded"):
        find_models()


def test_a_bad_download_is_rejected_and_not_kept(cache, monkeypatch):
    def html_page(url, target):
        with open(target, "w") as f:
            f.write("<html>quota exceeded</html>")

    monkeypatch.setattr(urllib.request, "urlretrieve", html_page)
    with pytest.raises(ValueError, match="not a"):
        find_models()
    assert not any(cache.iterdir())


def test_a_failed_download_explains_the_offline_route(cache, stand_ins, monkeypatch):
    def offline(url, target):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError) as e:
        find_models()
    # every missing file's address in one message (it used to name the first alone, so an
    # offline user learnt them one run at a time)
    first, urls = MODEL_URLS["hand_landmarker.task"], " ".join(MODEL_URLS.values())
    assert str(e.value) == (
        f"could not download {first} (network unreachable); download the missing files by hand "
        f"into {cache} ({urls}), or pass --models DIR / set {ENV_VAR}"
    )
    assert os.listdir(cache) == []
    # the files there already are not asked for again
    shutil.copy(stand_ins / "hand_landmarker.task", cache)
    with pytest.raises(FileNotFoundError) as e:
        find_models()
    rest = [MODEL_URLS["pose_landmarker_full.task"], MODEL_URLS["blaze_face_short_range.tflite"]]
    assert f"by hand into {cache} ({' '.join(rest)}), or" in str(e.value)


def test_a_folder_that_does_not_exist_is_said_to_be_missing(tmp_path, monkeypatch):
    names = "hand_landmarker.task, pose_landmarker_full.task, blaze_face_short_range.tflite"
    (tmp_path / "file").write_text("x")
    for path, state in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "file", "a file")):
        with pytest.raises(FileNotFoundError) as e:
            find_models(path)
        assert str(e.value) == f"--models {path}: {state}; give the folder that holds {names}"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        find_models(None)
    assert str(e.value) == (
        f"${ENV_VAR} {tmp_path / 'nowhere'}: no such folder; point it at the folder that holds "
        f"{names}, or unset it to use the download cache"
    )
