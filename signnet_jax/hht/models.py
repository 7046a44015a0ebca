"""Where the MediaPipe Tasks model files come from: a folder, or a one-time download."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import urllib.request
import zipfile

ENV_VAR = "SIGNNET_MEDIAPIPE_MODELS"
# Official MediaPipe Tasks files, pinned to version 1 so a cached copy never goes stale.
MODEL_URLS = {
    "hand_landmarker.task": "https://storage.googleapis.com/mediapipe-models/hand_landmarker/"
    "hand_landmarker/float16/1/hand_landmarker.task",
    "pose_landmarker_full.task": "https://storage.googleapis.com/mediapipe-models/"
    "pose_landmarker/pose_landmarker_full/float16/1/pose_landmarker_full.task",
    "blaze_face_short_range.tflite": "https://storage.googleapis.com/mediapipe-models/"
    "face_detector/blaze_face_short_range/float16/1/blaze_face_short_range.tflite",
}
# Members a .task bundle must hold for its MediaPipe task to load.
_BUNDLE_MEMBERS = {
    "hand_landmarker.task": {"hand_detector.tflite", "hand_landmarks_detector.tflite"},
    "pose_landmarker_full.task": {"pose_detector.tflite", "pose_landmarks_detector.tflite"},
}
_MANIFEST = "signnet_models.json"


class ModelFileError(ValueError):
    """A MediaPipe model file that exists but cannot be used (corrupt, wrong file)."""


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "signnet_jax" / "mediapipe"


def check_model_file(path: pathlib.Path, name: str | None = None) -> None:
    """Raises ModelFileError if `path` is not a plausible MediaPipe model file.

    A .task must be a zip holding the bundle's two .tflite members; a .tflite must
    carry the TFLite flatbuffer identifier 'TFL3'.

    Args:
      path: the file.
      name: the model file name it stands for (default: the file's own name).
    """
    name = name or path.name
    if name.endswith(".task"):
        try:
            with zipfile.ZipFile(path) as zf:
                members = set(zf.namelist())
        except zipfile.BadZipFile as e:
            raise ModelFileError(
                f"{path}: not a MediaPipe .task bundle (not a zip: {e}){_fix(name)}"
            ) from e
        missing = _BUNDLE_MEMBERS.get(name, set()) - members
        if missing:
            raise ModelFileError(f"{path}: bundle lacks {sorted(missing)}{_fix(name)}")
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[4:8] != b"TFL3":
            raise ModelFileError(f"{path}: not a TFLite model (no TFL3 identifier){_fix(name)}")


def _fix(name: str) -> str:
    url = MODEL_URLS.get(name)
    return f"; replace it with the official file ({url})" if url else ""


def _missing(directory: pathlib.Path) -> list[str]:
    return [name for name in MODEL_URLS if not (directory / name).is_file()]


def find_models(models_dir: str | os.PathLike | None = None, download: bool = True) -> pathlib.Path:
    """Finds the folder holding the three MediaPipe model files.

    Looks in `models_dir`, then `$SIGNNET_MEDIAPIPE_MODELS`, then the user cache
    (~/.cache/signnet_jax/mediapipe), which is filled once by downloading the
    official files. A folder that was named explicitly must be complete: it is never
    silently replaced by the cache.

    Args:
      models_dir: folder given by the user (--models), or None.
      download: allow the one-time download into the cache.

    Returns:
      The folder with hand_landmarker.task, pose_landmarker_full.task and
      blaze_face_short_range.tflite.

    Raises:
      FileNotFoundError: a named folder lacks files, or the cache is empty and
        downloading is off or failed.
      ModelFileError: a model file is there but unusable (see `check_model_file`).
    """
    for label, candidate in (("--models", models_dir), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if candidate:
            directory = pathlib.Path(candidate).expanduser()
            if not directory.is_dir():  # else reported as lacking every file
                state = "a file" if directory.exists() else "no such folder"
                names = ", ".join(MODEL_URLS)
                if label == "--models":
                    fix = f"give the folder that holds {names}"
                else:
                    fix = f"point it at the folder that holds {names}, or unset it to use the "
                    fix += "download cache"
                raise FileNotFoundError(f"{label} {directory}: {state}; {fix}")
            missing = _missing(directory)
            if missing:
                drop = "leave it out" if label == "--models" else "unset it"
                raise FileNotFoundError(
                    f"{label} {directory} lacks {', '.join(missing)}; put MediaPipe's official "
                    f"files there ({', '.join(MODEL_URLS[name] for name in missing)}), or {drop} "
                    "to use the download cache"
                )
            for name in MODEL_URLS:
                check_model_file(directory / name)
            return directory
    cache = _cache_dir()
    if _missing(cache):
        if not download:
            raise FileNotFoundError(
                f"MediaPipe model files not found in {cache}; pass --models DIR or set {ENV_VAR}"
            )
        _download_all(cache)
    _verify_cache(cache)
    return cache


def _download_all(cache: pathlib.Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, url in MODEL_URLS.items():
        target = cache / name
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=cache)
            os.close(fd)
            try:
                try:
                    urllib.request.urlretrieve(url, tmp)
                except OSError as e:  # every file still missing, so one run tells them all
                    urls = " ".join(MODEL_URLS[n] for n in _missing(cache))
                    raise FileNotFoundError(
                        f"could not download {url} ({e}); download the missing files by hand "
                        f"into {cache} ({urls}), or pass --models DIR / set {ENV_VAR}"
                    ) from e
                check_model_file(pathlib.Path(tmp), name)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        manifest[name] = _sha256(target)
    (cache / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _verify_cache(cache: pathlib.Path) -> None:
    """Checks cached files against the hashes recorded when they were downloaded."""
    manifest_path = cache / _MANIFEST
    recorded = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name in MODEL_URLS:
        path = cache / name
        if name in recorded and _sha256(path) != recorded[name]:
            raise ModelFileError(
                f"{path} changed since it was downloaded (sha256 mismatch); delete it to "
                "download it again"
            )
        check_model_file(path)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
