import os
import subprocess
import sys

import pytest

from flowattn.runlock import LOCK_NAME, RunLock, RunLockedError


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert (tmp_path / "run" / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
        assert lock.stale_pid is None
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = (
        "import os, sys\n"
        "from flowattn.runlock import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "os.kill(os.getpid(), 9)\n"  # dies holding the lock, without releasing it
    )
    dead = subprocess.run([sys.executable, "-c", code])
    assert dead.returncode == -9
    recorded = int((tmp_path / LOCK_NAME).read_text())
    with RunLock(tmp_path) as lock:
        assert lock.stale_pid == recorded
