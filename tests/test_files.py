import multiprocessing.util
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from signnet_jax import files
from signnet_jax.files import atomic_write, interrupted, stamp
from tests.helpers import REPO


def test_atomic_write_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two", fsync=True)
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind


def test_interrupted_is_one_line_and_status_130(capsys, monkeypatch):
    assert interrupted("nothing written at out.mp4") == 130
    assert capsys.readouterr() == ("", "interrupted: nothing written at out.mp4\n")
    # in a terminal the line holds the echoed ^C (or a progress bar): a new line first
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    interrupted("x")
    assert capsys.readouterr().err == "\ninterrupted: x\n"


def test_stamp_tells_what_was_written_in_place(tmp_path):
    path = tmp_path / "out.mp4"
    assert stamp(path) is None and stamp(tmp_path / "no" / "such") is None
    path.write_bytes(b"old")
    before = stamp(path)
    assert stamp(path) == before
    atomic_write(path, b"new")  # renamed into place
    assert stamp(path) != before


@pytest.mark.parametrize(
    "argv, module",
    [
        (["python", "-m", "signnet_jax.main", "--config", "c.py"], "signnet_jax.main"),
        (["python", "-u", "-X", "importtime", "-m", "data_prep.hht"], "data_prep.hht"),
        (["python", "-msignnet_jax.predict", "--video", "v.mp4"], "signnet_jax.predict"),
        (["python", "-W", "ignore", "-m", "pytest", "tests"], "pytest"),
        (["python", "script.py", "-m", "signnet_jax.main"], ""),  # the script's own -m
        (["python", "-c", "import x", "-m", "signnet_jax.main"], ""),
        (["python"], ""),
    ],
)
def test_the_module_run_with_python_m_is_read_off_the_command_line(argv, module):
    assert files._run_module(argv) == module


def test_the_startup_handler_is_only_for_our_commands(monkeypatch):
    installed = []
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", multiprocessing.util.spawnv_passfds)
    monkeypatch.setenv(files._WORKER_OF, "")  # undone at the end: the marker set below too
    monkeypatch.delenv(files._WORKER_OF)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.append((sig, handler)))

    def first_call(argv):  # as in a new process
        monkeypatch.setattr(files, "_starting", None)
        return files.quiet_interrupt_while_starting(argv)

    for argv in (["python", "-m", "pytest"], ["python", "-c", "import signnet_jax"]):
        assert not first_call(argv)
    # a handler somebody else installed is left alone
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    assert not first_call(["python", "-m", "data_prep.hht"])
    assert installed == []
    files.interrupt_as_usual()  # nothing of ours to undo: the ignored SIGINT stays ignored
    assert installed == []
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    assert first_call(["python", "-m", "data_prep.hht"])
    assert installed == [(signal.SIGINT, files._exit_quietly)]
    assert not files.quiet_interrupt_while_starting(["python", "-m", "data_prep.hht"])  # once
    monkeypatch.setattr(signal, "getsignal", lambda sig: files._exit_quietly)
    files.interrupt_as_usual()
    assert installed[-1] == (signal.SIGINT, signal.default_int_handler)
    # a package imported once the command runs (data_prep from train or convert) does not
    # install it again
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    assert not files.quiet_interrupt_while_starting(["python", "-m", "signnet_jax.main"])
    assert len(installed) == 2


def test_a_command_s_spawned_workers_ignore_ctrl_c_and_sigterm_from_their_imports(monkeypatch):
    installed = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.append((sig, handler)))
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    monkeypatch.setenv(files._WORKER_OF, "")  # undone at the end: the marker set below too
    monkeypatch.delenv(files._WORKER_OF)
    spawn = multiprocessing.util.spawnv_passfds
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", spawn)  # undone at the end
    spawned = [
        "python", "-B", "-c",
        "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=4, pipe_handle=6)",
        "--multiprocessing-fork",
    ]  # fmt: skip

    def first_call(argv):  # as in a new process
        monkeypatch.setattr(files, "_starting", None)
        return files.quiet_interrupt_while_starting(argv)

    # a worker of a program of the user's own, importing the package: left alone
    assert not first_call(spawned)
    assert installed == []
    # a command marks the environment its workers inherit, with its process id
    assert first_call(["python", "-m", "signnet_jax.main"])
    assert os.environ[files._WORKER_OF] == f"signnet_jax.main:{os.getpid()}"
    assert multiprocessing.util.spawnv_passfds.__wrapped__ is spawn  # starts them shielded
    installed.clear()
    assert not first_call(spawned)  # a process the command's worker started: left alone
    assert installed == []
    command = os.getpid()
    monkeypatch.setattr(os, "getppid", lambda: command)  # the command's own worker
    assert not first_call(spawned)
    assert installed == [(signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_IGN)]


def test_a_command_s_worker_signalled_before_its_first_import_lives_on(tmp_path):
    # a Ctrl-C or SIGTERM to the process group while a worker's interpreter still starts
    # (before it imports the package, seconds on a loaded machine) killed it: a traceback, or
    # "Worker process was terminated unexpectedly" instead of the command's own stop
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import multiprocessing, os, signal, sys, time\n"
        "from signnet_jax import files\n"
        "if __name__ == '__main__':\n"
        "    files._starting = None  # as if run with python -m signnet_jax.main\n"
        "    files.quiet_interrupt_while_starting([sys.executable, '-m', 'signnet_jax.main'])\n"
        "    worker = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(1,))\n"
        "    worker.start()  # returns once the worker's interpreter is exec'd\n"
        "    os.kill(worker.pid, signal.SIGINT)\n"
        "    os.kill(worker.pid, signal.SIGTERM)\n"
        "    worker.join(60)\n"
        "    print(worker.exitcode, sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != files._WORKER_OF}
    proc = subprocess.run(
        [sys.executable, str(driver)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the worker slept its second and ended well; the command blocks nothing itself
    assert proc.stdout.split("\n")[0] == "0 []", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_ctrl_c_once_a_command_runs_is_its_own_message(tmp_path):
    # the smoke config imports data_prep only once main runs: that import used to install the
    # start-up handler again, so a Ctrl-C in training said "while starting" and left
    # temporaries behind
    proc = subprocess.Popen(
        [sys.executable, "-m", "signnet_jax.main", "--config", "configs/smoke.py",
         "--workdir", str(tmp_path / "w"), f"--config.records_dir={tmp_path / 'r'}",
         "--config.smoke.classes=2", "--config.smoke.train_per_class=4",
         "--config.model.num_frames=4", "--config.model.img_size=32",
         "--config.data.short_side_size=32", "--config.data.batch_size=2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # the dataset is made, the model built: the command runs
        if line.startswith("smoke dataset in "):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1].startswith("interrupted: ") and "while starting" not in err


def test_a_command_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    # `cmd &` in a script starts it with SIGINT ignored; a Ctrl-C meant for the script
    # must not stop it
    code = (
        "import os, signal, sys; from signnet_jax import files; files.interrupt_as_usual(); "
        "os.kill(os.getpid(), signal.SIGINT); print('still running')"
    )
    # as the shell does it: SIGINT ignored, then exec (inherited as ignored)
    r = subprocess.run(
        ["sh", "-c", 'trap "" INT; exec "$0" -c "$1"', sys.executable, code],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "still running\n"), r.stderr


def test_ctrl_c_while_a_command_imports_is_one_line_and_status_130(tmp_path):
    # SIGINT once JAX's native library is loaded: the command is still importing (flax, orbax,
    # grain follow), where a KeyboardInterrupt used to print a traceback
    proc = subprocess.Popen(
        [sys.executable, "-m", "signnet_jax.main", "--config", "configs/smoke.py",
         "--workdir", str(tmp_path / "w")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while "jaxlib" not in pathlib.Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (130, "", "interrupted while starting: nothing done\n")
    assert not (tmp_path / "w").exists()


def test_creation_problem_probes_the_nearest_existing_folder(tmp_path, monkeypatch):
    assert files.creation_problem(tmp_path / "new" / "deeper" / "ckpt") is None
    assert os.listdir(tmp_path) == []  # the probe file is gone, no folder was made
    (tmp_path / "file").write_text("x")
    assert files.creation_problem(tmp_path / "file" / "a" / "b.pth") == (
        f"{tmp_path / 'file'} is a file, not a folder"
    )

    def denied(**kwargs):
        assert kwargs["dir"] == tmp_path  # the folder the output would be made in
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    assert files.creation_problem(tmp_path / "a" / "b") == f"{tmp_path}: Permission denied"
    # an existing folder is probed inside: the run writes there (eval mode in a read-only
    # workdir used to evaluate, then fail to write the result)
    (tmp_path / "run").mkdir()
    probed = []

    def denied_inside(**kwargs):
        probed.append(kwargs["dir"])
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied_inside)
    assert files.creation_problem(tmp_path / "run") == f"{tmp_path / 'run'}: Permission denied"
    assert probed == [tmp_path / "run"]


def test_ctrl_c_after_raises_at_the_end_of_the_block():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    done = []
    with pytest.raises(KeyboardInterrupt):
        with files.ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
            done.append("the block went on")
    assert done == ["the block went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with files.ctrl_c_after():  # no Ctrl-C: nothing raised
        pass
    with pytest.raises(ValueError, match="^boom$"):  # the block's own error comes through
        with files.ctrl_c_after():
            raise ValueError("boom")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # an ignored SIGINT stays ignored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with files.ctrl_c_after():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_after_lets_a_second_ctrl_c_through_and_keeps_what_the_block_installs():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with files.ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("held")
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(0.05)
            reached.append("never")
    assert reached == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # nested: the inner one finds the outer one's handler and leaves it be
    with pytest.raises(KeyboardInterrupt):
        with files.ctrl_c_after():
            outer = signal.getsignal(signal.SIGINT)
            with files.ctrl_c_after():
                assert signal.getsignal(signal.SIGINT) is outer
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            assert signal.getsignal(signal.SIGINT) is outer
            reached.append("after the inner block")
    assert reached == ["held", "after the inner block"]

    def own(signum, frame):
        pass

    try:
        with files.ctrl_c_after():
            signal.signal(signal.SIGINT, own)
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # off the main thread nothing is installed (signal handlers belong to the main thread)
    seen = []

    def in_thread():
        with files.ctrl_c_after():
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen == [signal.default_int_handler]
