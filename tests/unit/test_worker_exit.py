"""Worker and helper processes end with their parent (`core.runtime.exit_with_parent`): a killed sweep must not
leave its pool workers training attackers for minutes on a shared 2-core machine."""

import os
import signal
import subprocess
import sys
import time

CODE = """
import os, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from splitveil.core.runtime import init_worker

def pid_then_sleep(_):
    return os.getpid()

def sleep(_):
    time.sleep(60)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=init_worker, initargs=(1,))
    pids = set()
    while len(pids) < 2:
        pids |= set(pool.map(pid_then_sleep, range(8)))
    for _ in range(2):
        pool.submit(sleep, None)
    print(*sorted(pids), flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_pool_workers_end_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(CODE)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(0.5)  # both are inside their 60 s task now
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), "a pool worker outlived its killed parent"
    finally:
        parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
