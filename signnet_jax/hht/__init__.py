"""Head & Hands Tunnelling: MediaPipe landmarks -> head / hand boxes -> tunnelled frames."""

from signnet_jax.hht.boxes import Landmarks, compute_boxes
from signnet_jax.hht.compose import compose_frames, layout_cells
from signnet_jax.hht.models import find_models
from signnet_jax.hht.settings import HHTSettings
from signnet_jax.hht.tunnel import HHTResult, NoPersonWarning, Tunneller, coverage
from signnet_jax.hht.video import VideoError, read_video, write_video

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
    "write_video",
]
