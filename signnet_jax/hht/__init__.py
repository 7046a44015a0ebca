"""Head & Hands Tunnelling: MediaPipe landmarks -> head / hand boxes -> tunnelled frames.

The names that need MediaPipe (``Tunneller`` and its results) load it on first use, so the
box and composition code (the synthetic smoke dataset's) runs without importing it: MediaPipe
keeps an import-time exception (no audio device) whose traceback holds every frame that was
on the stack when it was first imported, with their locals, such as a training run's model.
"""

from signnet_jax.hht.boxes import Landmarks, compute_boxes
from signnet_jax.hht.compose import compose_frames, layout_cells
from signnet_jax.hht.models import find_models
from signnet_jax.hht.settings import HHTSettings
from signnet_jax.hht.video import VideoError, read_video, write_video

_TUNNEL_NAMES = ("HHTResult", "NoPersonWarning", "Tunneller", "coverage", "tunnel_landmarks")


def __getattr__(name: str):
    if name in _TUNNEL_NAMES:
        from signnet_jax.hht import tunnel

        return getattr(tunnel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TUNNEL_NAMES))


__all__ = [
    "HHTResult",
    "HHTSettings",
    "Landmarks",
    "NoPersonWarning",
    "Tunneller",
    "VideoError",
    "compose_frames",
    "compute_boxes",
    "coverage",
    "find_models",
    "layout_cells",
    "read_video",
    "tunnel_landmarks",
    "write_video",
]
