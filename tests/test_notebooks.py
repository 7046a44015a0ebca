"""The Colab notebooks run end to end on the CPU in their smoke setting (nbclient)."""

import json
import os
import pathlib
import re
import shutil

import cv2
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from signnet_jax import checkpointing
from signnet_jax.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("train_tpu.ipynb", "predict.ipynb")


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "colab" / name, as_version=4)


def set_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Rewrite ``NAME = ...`` lines of the first code cell (the parameter cell).

    Args:
      nb: the notebook (changed in place).
      **values: parameter name -> new value (written with repr).

    Returns:
      nb.
    """
    cell = next(c for c in nb.cells if c.cell_type == "code")
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = .*$", re.MULTILINE)
        assert len(pattern.findall(cell.source)) == 1, f"parameter {name} not in the first cell"
        cell.source = pattern.sub(lambda _, v=value, n=name: f"{n} = {v!r}", cell.source)
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel with the repository root as working directory."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "data" in o and "text/plain" in o.data:
                out.append(o.data["text/plain"])
    return "".join(out)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs_and_parameters_first(name):
    nb = _load(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, name
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert re.search(r"^SMOKE = False$", first.source, re.MULTILINE), name


@pytest.mark.parametrize(
    "name, values, example",
    [
        ("train_tpu.ipynb", {}, "BUCKET = 'gs://YOUR_BUCKET/signnet'"),
        ("train_tpu.ipynb", {"BUCKET": "/content/b"}, "REPO_URL = 'https://github.com/YOUR_ORG/"),
        ("predict.ipynb", {}, "REPO_URL = 'https://github.com/YOUR_ORG/"),
    ],
)
def test_notebooks_refuse_example_parameters_before_any_work(name, values, example):
    # on Colab (google.colab imported), with the parameter cell as stored
    nb = set_parameters(_load(name), **values)
    colab = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')"
    nb.cells = [
        nbformat.v4.new_code_cell(colab),
        *[c for c in nb.cells if c.cell_type == "code"][:2],
    ]
    with pytest.raises(CellExecutionError) as e:
        execute(nb, timeout=120)
    assert example in str(e.value)
    assert "is the example value; set it in the first cell" in str(e.value)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_nb")
    nb = set_parameters(_load("train_tpu.ipynb"), SMOKE=True, SMOKE_WORKDIR=str(root))
    return root, execute(nb)


@pytest.mark.heavy
def test_train_notebook_smoke(train_run):
    root, nb = train_run
    text = _text(nb)
    assert "8 x" in text  # every (simulated) device of the runtime
    # The run was mirrored to the stand-in bucket, with a model checkpoint and test metrics.
    run = root / "bucket" / "runs" / "smoke"
    steps = checkpointing.checkpoint_steps(run / "checkpoints")
    assert steps and max(steps) == 4
    _, meta = checkpointing.load_model(run / "checkpoints")
    assert meta["classes"] == records.load_dataset_info(root / "records")["classes"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test"]["views_per_video"] == 3
    assert "per_instance" in text and "top-1" in text
    assert _images(nb) == 2  # the training curves and the confused-pairs figure
    assert not list(root.glob("bucket/runs/*.copying")) and not list(root.glob("bucket/runs/*.old"))
    # the compiled training step is kept beside the runs, for the next session to load
    assert len(list((root / "bucket" / "xla_cache").glob("jit_train_step-*-cache"))) == 1


@pytest.mark.heavy
def test_train_notebook_resumes_from_the_bucket(train_run, tmp_path):
    # A new Colab session: no local run, the bucket holds step 4; train on to step 6.
    root, _ = train_run
    shutil.copytree(root / "records", tmp_path / "records")
    shutil.copytree(root / "bucket", tmp_path / "bucket")
    nb = set_parameters(
        _load("train_tpu.ipynb"), SMOKE=True, SMOKE_WORKDIR=str(tmp_path), SMOKE_STEPS=6
    )
    text = _text(execute(nb))
    assert "resuming from" in text and "steps 4 -> 6 of" in text  # continued, not restarted
    run = tmp_path / "bucket" / "runs" / "smoke"
    assert max(checkpointing.checkpoint_steps(run / "checkpoints")) == 6
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


@pytest.mark.heavy
def test_predict_notebook_smoke(train_run, tmp_path, shared_dir, monkeypatch):
    root, _ = train_run
    monkeypatch.setenv("SIGNNET_SHARED", str(shared_dir))
    nb = set_parameters(
        _load("predict.ipynb"),
        SMOKE=True,
        SMOKE_WORKDIR=str(tmp_path),
        CHECKPOINT=str(root / "bucket" / "runs" / "smoke"),
    )
    nb = execute(nb)
    text = _text(nb)
    assert "sign_sample.mp4: 76 frames" in text
    # the printed total counts the start-up (load, compile) too
    line = next(x for x in text.splitlines() if x.startswith("timings: load"))
    parts = dict(p.rsplit(" ", 2)[:2] for p in line.removeprefix("timings: ").split(" | "))
    times = {k: float(v) for k, v in parts.items()}
    assert times["total"] >= sum(v for k, v in times.items() if k != "total") - 5  # rounding
    assert _images(nb) == 1  # the preview: the contact sheet above the top-5 bar chart
    assert cv2.imread(str(tmp_path / "sign_sample_preview.png")).shape[1] == 1000
    report = json.loads((tmp_path / "prediction.json").read_text())
    assert len(report["top_k"]) == 5 and report["hht"]["frames"] == 76
    probs = [t["probability"] for t in report["top_k"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
    assert report["views"]["count"] == 3
    assert os.path.getsize(tmp_path / "sign_sample_hht.mp4") > 0


def test_train_notebook_copies_survive_interrupted_swaps(tmp_path):
    import subprocess

    cell = next(c for c in _load("train_tpu.ipynb").cells if "def mirror(" in c.source)
    ns = {"os": os, "subprocess": subprocess}
    exec(cell.source, ns)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "step").write_text("new")
    # a stop while the previous copy was being deleted left dst.old beside dst
    (tmp_path / "dst.old").mkdir()
    (tmp_path / "dst.old" / "step").write_text("older")
    dst.mkdir()
    (dst / "step").write_text("old")
    ns["mirror"](str(src), str(dst))
    assert (dst / "step").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    # a stop between the two renames: dst gone, dst.old holds the last good copy
    dst.rename(tmp_path / "dst.old")
    assert ns["exists"](str(dst)) and (dst / "step").read_text() == "new"
    assert not ns["exists"](str(tmp_path / "nothing"))
