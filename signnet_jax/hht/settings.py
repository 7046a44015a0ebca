"""H&HT settings: one frozen dataclass that travels into dataset_info.json and checkpoints."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

LAYOUTS = ("grid2x2", "strip")
# Cell order everywhere in this package: whole frame, head, right hand, left hand (body sides).
PARTS = ("frame", "head", "right_hand", "left_hand")
# The settings MediaPipe's detections depend on (the Tunneller's detect); the others shape
# only the boxes and the composition, so one video's landmarks serve every value of them.
DETECTION_FIELDS = ("faithful", "detect_size", "min_confidence", "gate_hands", "hand_retry")
_FLAGS = {"1": True, "0": False, "true": True, "false": False}


def parse_quadrants(text: str) -> tuple[bool, bool, bool, bool]:
    """Parses the command lines' --quadrants: '1011', or comma-separated '1,0,1,1' / 'true,...'.

    Args:
      text: four flags in PARTS order.

    Returns:
      The four flags, for HHTSettings.quadrants.

    Raises:
      ValueError: not four 0/1 flags (the message names --quadrants and both forms).
    """
    words = text.split(",") if "," in text else list(text.strip())
    words = [w.strip().lower() for w in words]
    if len(words) != 4 or any(w not in _FLAGS for w in words):
        raise ValueError(
            "--quadrants takes four 0/1 flags for frame, head, right hand, left hand, like 1011 "
            f"or 1,0,1,1; got {text!r}"
        )
    return tuple(_FLAGS[w] for w in words)


class HHTSettingsError(ValueError):
    """Invalid settings; ``problems`` holds ``(field, what is wrong)`` pairs, which command
    lines name by their flags (``flag_message``)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(
            "invalid HHTSettings: " + "; ".join(f"{name} {text}" for name, text in problems)
        )

    def flag_message(self) -> str:
        """The problems as a command line's flags say them: ``--size must be ...``."""
        return "; ".join(f"--{name.replace('_', '-')} {text}" for name, text in self.problems)


@dataclasses.dataclass(frozen=True)
class HHTSettings:
    """How H&HT locates the head and hands and composes the output frame.

    Attributes:
      layout: 'grid2x2' (published: whole frame top-left, right hand top-right, head
        bottom-left, left hand bottom-right) or 'strip' (whole frame on top, head, right
        hand and left hand in a row below).
      size: output frame side in pixels (square output, even).
      quadrants: which cells are drawn, in the order frame, head, right hand, left hand;
        a switched-off cell stays black (the paper's ablations).
      faithful: reproduce the original preprocessing: landmark boxes plus a fixed pixel
        margin, no fallbacks, no interpolation or smoothing, black cell when a part is
        missing, whole frame and crops stretched to their cells.
      faithful_margin_px: the original's pixel margin around landmark boxes.
      head_margin: fraction of the (square) head box side added on each side.
      hand_margin: fraction of the (square) hand box side added on each side.
      hand_scale: side of a pose-fallback hand box as a fraction of the shoulder width.
      wrist_visibility: pose wrist visibility above which the pose fallback places a hand.
      max_gap: longest run of missing frames filled by interpolation between detections.
      max_hold: frames a box is held beyond the first/last detection of a run.
      smoothing: sigma in frames of the Gaussian that smooths box centre and size
        (0 = off).
      detect_size: longest side of a downscaled copy for the detectors (0 = the frame
        itself); crops always come from the full-resolution frame. Off by default:
        MediaPipe crops and resizes its regions itself, so on 1280x720 our resize only
        added time (bench/hht.py).
      min_confidence: detection / presence / tracking threshold of all MediaPipe tasks.
      gate_hands: run the hand landmarker only in frames where the pose sees a wrist in
        the frame, since elsewhere it cannot find a hand we would use.
      hand_retry: with gate_hands, after a hand-landmarker run that found no hand, the
        next run comes this many frames later (1 = every frame).
    """

    layout: str = "grid2x2"
    size: int = 256
    quadrants: tuple[bool, bool, bool, bool] = (True, True, True, True)
    faithful: bool = False
    faithful_margin_px: int = 10
    head_margin: float = 0.15
    hand_margin: float = 0.15
    hand_scale: float = 0.6
    wrist_visibility: float = 0.5
    max_gap: int = 12
    max_hold: int = 6
    smoothing: float = 1.0
    detect_size: int = 0
    min_confidence: float = 0.5
    gate_hands: bool = True
    hand_retry: int = 3

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise JSON lists to tuples through object.__setattr__.
        object.__setattr__(self, "quadrants", tuple(bool(q) for q in self.quadrants))
        problems: list[tuple[str, str]] = []  # (field, what is wrong with it)
        if self.layout not in LAYOUTS:
            problems.append(("layout", f"must be one of {LAYOUTS}, got {self.layout!r}"))
        if not isinstance(self.size, int) or self.size < 16 or self.size % 2:
            problems.append(("size", f"must be an even integer >= 16, got {self.size!r}"))
        if len(self.quadrants) != 4:
            problems.append(
                ("quadrants", f"needs 4 flags ({', '.join(PARTS)}), got {self.quadrants}")
            )
        elif not any(self.quadrants):
            problems.append((
                "quadrants",
                "are all off, which makes every frame black; switch on at least one of "
                f"{', '.join(PARTS)}",
            ))  # fmt: skip
        for name in ("head_margin", "hand_margin", "smoothing"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if not 0 <= self.min_confidence <= 1:  # MediaPipe's own range
            problems.append(("min_confidence", f"must be in [0, 1], got {self.min_confidence}"))
        if self.hand_scale <= 0:
            problems.append(("hand_scale", f"must be > 0, got {self.hand_scale}"))
        if not isinstance(self.hand_retry, int) or self.hand_retry < 1:
            problems.append(("hand_retry", f"must be an integer >= 1, got {self.hand_retry!r}"))
        for name in ("faithful_margin_px", "max_gap", "max_hold", "detect_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append((name, f"must be an integer >= 0, got {value!r}"))
        if not 0 <= self.wrist_visibility <= 1:
            problems.append(("wrist_visibility", f"must be in [0, 1], got {self.wrist_visibility}"))
        if problems:
            raise HHTSettingsError(problems)

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a JSON-able dict (lists for tuples)."""
        d = dataclasses.asdict(self)
        d["quadrants"] = list(self.quadrants)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HHTSettings:
        """Builds settings from `to_dict` output; unknown keys are an error.

        Args:
          d: mapping of field name to value; missing fields take their defaults.

        Returns:
          The settings.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown HHTSettings keys {unknown}; known keys are {sorted(known)} "
                "(written by a newer signnet_jax?)"
            )
        return cls(**d)


def field_help() -> dict[str, str]:
    """Each setting's meaning, one line, from HHTSettings' docstring (its Attributes)."""
    doc = HHTSettings.__doc__ or ""
    attributes = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    help_text: dict[str, str] = {}
    for m in re.finditer(r"^ {6}(\w+): (.*?)(?=^ {6}\w+: |\Z)", attributes, re.M | re.S):
        help_text[m.group(1)] = " ".join(m.group(2).split())
    return help_text
