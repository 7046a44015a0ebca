"""Shared test setup: 8 simulated CPU devices and the ../shared assets."""

import os
import pathlib

import jax
import pytest

# The suite runs on the CPU wherever it is run (a GPU box, a TPU VM): mesh tests need 8
# devices, and numbers are compared at CPU float32 tolerances. Set before any backend starts,
# and in the environment for the subprocesses the tests start.
jax.config.update("jax_platforms", "cpu")
os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 8)

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
