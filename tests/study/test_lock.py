"""A run folder has one driver: a live holder is refused in one line, a dead one's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from relapse.errors import UserError
from relapse.study.lock import LOCK_FILE, process_start, run_lock


def write_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "since": 0} | holder))


def test_a_second_driver_is_refused_while_the_first_holds_the_folder(tmp_path):
    with run_lock(tmp_path / "run") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"in use by another relapse study \(pid {os.getpid()} on .*--out") as refused:
            with run_lock(tmp_path / "run"):
                pass
        assert refused.value.exit_code == 2 and "\n" not in str(refused.value)
        assert path.is_file()  # the refusal left the holder's lock alone
    assert not path.exists()  # released on exit


def test_a_live_process_of_another_driver_keeps_its_lock(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=other.pid, process_start=process_start(other.pid))
        with pytest.raises(UserError, match=f"pid {other.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("holder", [
    {"pid": 2**22 + 12345, "process_start": 1.0},  # no such process
    {"pid": os.getpid(), "process_start": 1.0},  # the pid lives on in another process (reused)
])
def test_a_dead_drivers_lock_is_taken_over_with_a_warning(tmp_path, caplog, holder):
    write_lock(tmp_path, **holder)
    with run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "is no longer running" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stale copy or draft left behind


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    write_lock(tmp_path, host="elsewhere.example", pid=1, process_start=1.0)
    with pytest.raises(UserError, match="on elsewhere.example"):
        with run_lock(tmp_path):
            pass
