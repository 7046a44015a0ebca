"""HHTSettings: JSON round trip and validation."""

import json

import pytest

from signnet_jax.hht import HHTSettings


def test_round_trip_through_json():
    s = HHTSettings(layout="strip", size=224, quadrants=(True, False, True, True), faithful=True)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["quadrants"] == [True, False, True, True]
    assert HHTSettings.from_dict(d) == s


def test_defaults_are_the_published_layout():
    s = HHTSettings()
    assert (s.layout, s.size, s.quadrants, s.faithful) == ("grid2x2", 256, (True,) * 4, False)
    assert HHTSettings.from_dict({}) == s


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown HHTSettings keys \['sise'\]"):
        HHTSettings.from_dict({"sise": 256})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "grid3x3"}, "layout must be one of"),
        ({"size": 255}, "size must be an even integer"),
        ({"size": 8}, "size must be an even integer"),
        ({"quadrants": (True, True, True)}, "quadrants needs 4 flags"),
        (
            {"quadrants": (False,) * 4},
            r"quadrants are all off, which makes every frame black; switch on at least one of "
            r"frame, head, right_hand, left_hand$",
        ),
        ({"head_margin": -0.1}, "head_margin must be >= 0"),
        ({"max_gap": -1}, "max_gap must be an integer >= 0"),
        ({"wrist_visibility": 1.5}, r"wrist_visibility must be in \[0, 1\]"),
        ({"hand_scale": 0}, "hand_scale must be > 0"),
        ({"hand_retry": 0}, "hand_retry must be an integer >= 1"),
    ],
)
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HHTSettings(**kwargs)


def test_parse_quadrants_takes_both_command_line_forms():
    from signnet_jax.hht.settings import parse_quadrants

    for text in ("1011", "1,0,1,1", " 1, 0, 1, 1 ", "true,False,1,1"):
        assert parse_quadrants(text) == (True, False, True, True), text
    for text in ("101", "10111", "1,0,1", "11x1", "1 0 1 1", "", "yes,no,yes,yes"):
        with pytest.raises(ValueError) as e:
            parse_quadrants(text)
        assert str(e.value) == (
            "--quadrants takes four 0/1 flags for frame, head, right hand, left hand, like 1011 "
            f"or 1,0,1,1; got {text!r}"
        )
