"""signnet_jax.hht.quiet: MediaPipe's native fd-2 logs are dropped, errors are not."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from signnet_jax.hht.quiet import ENV_VAR, quiet_native_logs

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quiet_by_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_native_writes_are_dropped_and_fd2_restored(capfd):
    os.write(2, b"before\n")
    with quiet_native_logs():
        os.write(2, b"I0000 00:00:1.0 1 native.cc:1] noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"


def test_an_exception_re_emits_the_captured_text_and_restores_fd2(capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with quiet_native_logs():
            os.write(2, b"E0000 native.cc:2] what went wrong\n")
            raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "E0000 native.cc:2] what went wrong\nafter\n"


def test_nested_blocks_share_one_redirect(capfd):
    with pytest.raises(ValueError):
        with quiet_native_logs():
            os.write(2, b"outer\n")
            with quiet_native_logs():
                os.write(2, b"inner\n")
            os.write(2, b"still captured\n")
            raise ValueError
    os.write(2, b"after\n")
    # re-emitted once, when the exception leaves the outer block
    assert capfd.readouterr().err == "outer\ninner\nstill captured\nafter\n"


def test_concurrent_blocks_restore_fd2_when_the_last_ends(capfd):
    inside, release = threading.Barrier(2), threading.Event()

    def other():
        with quiet_native_logs():
            inside.wait()
            release.wait(10)
            os.write(2, b"other thread's noise\n")

    thread = threading.Thread(target=other)
    thread.start()
    with quiet_native_logs():
        inside.wait()
    os.write(2, b"main thread, other still inside\n")  # captured: fd 2 is per process
    release.set()
    thread.join(10)
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_the_environment_variable_lets_the_logs_through(capfd, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    with quiet_native_logs():
        os.write(2, b"W0000 native.cc:3] shown\n")
    assert capfd.readouterr().err == "W0000 native.cc:3] shown\n"


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip


def test_python_stderr_is_flushed_in_order_and_a_forked_child_gets_real_stderr():
    # sys.stderr is block-buffered when it is a pipe; what Python wrote before the block
    # must not end up in the capture, and a child forked inside the block writes to the
    # real stderr.
    proc = _run(
        """
        import os, sys
        from signnet_jax.hht.quiet import quiet_native_logs
        sys.stderr = open(2, "w", buffering=8192, closefd=False)
        sys.stderr.write("python before\\n")
        with quiet_native_logs():
            os.write(2, b"native noise\\n")
            pid = os.fork()
            if pid == 0:
                os.write(2, b"forked child\\n")
                os._exit(0)
            os.waitpid(pid, 0)
        sys.stderr.write("python after\\n")
        sys.stderr.flush()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "python before\nforked child\npython after\n"


def test_a_mediapipe_error_shows_its_native_message(shared_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(shared_dir / "mediapipe_models", models)
    face = models / "blaze_face_short_range.tflite"
    face.write_bytes(face.read_bytes()[:3000])
    proc = _run(
        """
        import os, sys
        from signnet_jax.hht import Tunneller
        try:
            Tunneller(models_dir=sys.argv[1])
        except ValueError as e:
            print(f"raised: {e}", file=sys.stderr, flush=True)
        os.write(2, b"fd 2 after the error\\n")
        """,
        str(models),
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    # MediaPipe's own line (captured, then re-emitted), the exception, fd 2 working again
    native = err.index("ERROR: The model is not a valid Flatbuffer buffer\n")
    assert native < err.index("raised: ") < err.index("fd 2 after the error\n")
