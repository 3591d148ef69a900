"""Temporary directories a tp-reload process owns (``orchestrator.scratch``): removed when it
closes them, and by the next start after it dies; a live owner's, or a directory that is
not ours, is never touched. (A local Ray in one: the demo's test in test_reporting.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from orchestrator.scratch import OWNER, owned_temp_dir, sweep_dead

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "tp-reload-scratch-test-"


def owner_process(prefix: str) -> tuple[subprocess.Popen, Path]:
    """Another process that owns a directory with ``prefix``, with a file in it, then waits."""
    code = ("import sys, time; from orchestrator.scratch import owned_temp_dir\n"
            f"with owned_temp_dir({prefix!r}) as path:\n"
            "    (path / 'data').write_bytes(b'x' * 100)\n"
            "    print(path, flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    return child, Path(child.stdout.readline().strip())


def test_an_owned_directory_goes_with_its_block_or_its_dead_owner():
    with owned_temp_dir(PREFIX) as mine:
        assert mine.is_dir() and (mine / OWNER).exists()
        (mine / "sub").mkdir()
        (mine / "sub" / "file").write_text("x")
    assert not mine.exists()

    live, live_dir = owner_process(PREFIX)
    dead, dead_dir = owner_process(PREFIX)
    foreign = Path(tempfile.mkdtemp(prefix=PREFIX))  # no owner file: not ours, or still new
    try:
        dead.send_signal(signal.SIGKILL)  # no cleanup of any kind runs in it
        dead.wait(timeout=30)
        assert dead_dir.is_dir(), "a killed owner leaves its directory"
        assert sweep_dead(PREFIX) == [dead_dir]
        assert not dead_dir.exists() and live_dir.is_dir() and foreign.is_dir()
        with owned_temp_dir(PREFIX) as mine:  # a start sweeps before it makes its own
            assert live_dir.is_dir() and foreign.is_dir() and mine.is_dir()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
        foreign.rmdir()
    assert sweep_dead(PREFIX) == [live_dir]
