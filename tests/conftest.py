"""Shared test setup: 8 simulated CPU devices and the ../shared assets."""

import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# The suite runs on the CPU wherever it is run (a GPU box, a TPU VM): mesh tests need 8
# devices, and numbers are compared at CPU float32 tolerances. Set before any backend starts,
# and in the environment for the subprocesses the tests start.
jax.config.update("jax_platforms", "cpu")
os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 8)

# Compiled programs are kept on disk for the run and shared by pytest's workers and the
# commands the tests start, which compile the same tiny models again and again. A run makes its
# own folder and removes it at the end; set JAX_COMPILATION_CACHE_DIR to keep one across runs.
# The size limit turns on JAX's file lock, so no process reads an entry another is writing.
_XLA_CACHE_OWNER = "SIGNNET_TEST_XLA_CACHE_OWNER"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="signnet-test-xla-")
    os.environ[_XLA_CACHE_OWNER] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
for _name, _kind in (
    ("JAX_COMPILATION_CACHE_DIR", str),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", float),
    ("JAX_COMPILATION_CACHE_MAX_SIZE", int),
):
    jax.config.update(_name.lower(), _kind(os.environ[_name]))


def pytest_sessionfinish(session):
    """The process that made the run's compilation cache (pytest's main one) removes it."""
    if os.environ.get(_XLA_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


_REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SIGNNET_SHARED", _REPO.parent / "shared")).resolve()
    if not (path / "assets" / "sign_sample.mp4").is_file():
        raise RuntimeError(
            f"shared assets not found at {path}: put the shared folder beside the checkout "
            "or set SIGNNET_SHARED to its path (.ci/run does this)"
        )
    return path


SHARED = _shared_dir()
os.environ["SIGNNET_SHARED"] = str(SHARED)  # absolute, for subprocesses with another cwd
# MediaPipe bundles come from the offline stand-ins; tests never download.
os.environ["SIGNNET_MEDIAPIPE_MODELS"] = str(SHARED / "mediapipe_models")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    return SHARED


@pytest.fixture(scope="session")
def sign_sample() -> pathlib.Path:
    return SHARED / "assets" / "sign_sample.mp4"
