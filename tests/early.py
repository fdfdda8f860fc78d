"""The suite's slowest single-process jobs, started as soon as collection ends, on the core that the (mostly
one-process, one-thread) suite leaves idle; the fixture that needs a job's result waits for it.

A test module registers a job under the name of the fixture that reads it (`job("fake_run", SCRIPT)` at import);
conftest starts the jobs whose fixture a selected test uses (`-k` selecting none of them starts none). Only jobs whose
results are counts, not timings, belong here (bytes traced or measured): they run beside other tests."""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {}     # fixture name -> Python source run as `python -c`, from the repository root
RUNNING = {}  # fixture name -> (process, its stdout file, its stderr file)


def job(name: str, script: str):
    JOBS[name] = script


def start(names):
    """Start each registered job among `names` that is not running yet (stdout and stderr to files: a pipe nobody
    reads would block the job once it fills)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1"}
    for name in names:
        if name in JOBS and name not in RUNNING:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, "-c", JOBS[name]], cwd=ROOT, env=env, stdout=out, stderr=err)
            RUNNING[name] = proc, out, err


def result(name: str, timeout: float = 600) -> dict:
    """The job's last line of stdout, as JSON (started now if it was not started early)."""
    start([name])
    proc, out, err = RUNNING[name]
    proc.wait(timeout=timeout)
    out.seek(0), err.seek(0)
    assert proc.returncode == 0, f"{name} failed:\n{err.read()[-3000:]}"
    return json.loads(out.read().strip().splitlines()[-1])


def stop():
    """Kill the jobs still running (a test failed before it waited for its job)."""
    for proc, _, _ in RUNNING.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
