"""README's first command: the smoke config trains to >= 90% top-1 from nothing."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_smoke_config_reaches_90_percent(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "signnet_jax.main",
            "--config",
            "configs/smoke.py",
            "--workdir",
            str(tmp_path / "work"),
            f"--config.records_dir={tmp_path / 'records'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert metrics["steps"] == 1200
    assert metrics["test"]["num_videos"] == 60
    assert metrics["test"]["per_instance"]["top1"] >= 0.9
    assert "test split (3 views per video, 60 videos): P-I top-1" in r.stdout
