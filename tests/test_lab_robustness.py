"""The lab under abuse: killed with SIGKILL, two runs on one directory, temporaries left by a killed run."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

from layernorm.lab import cli  # noqa: E402

if not os.path.isdir("/proc/self"):  # pragma: no cover
    pytest.skip("these tests read the process table from /proc", allow_module_level=True)


def _table():
    """pid -> (ppid, state) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(rest[1]), rest[0])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(pid):
    table = _table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (pp, _) in table.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _alive(pids):
    table = _table()
    return {p for p in pids if p in table and table[p][1] != "Z"}  # a zombie has exited


def _start(out, *args):
    cmd = [sys.executable, "-m", "layernorm.lab", "--quick", "--no-progress", "--workers", "2", "--out", str(out),
           *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(predicate, timeout, what):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("only, at_least", [("cnn", 3), ("parallel", 4)])
def test_sigkill_leaves_no_worker_behind(tmp_path, only, at_least):
    # cnn: 2 pool workers + the resource tracker; parallel: a pool worker and its 2 DDP ranks (+ tracker)
    proc = _start(tmp_path, "--only", only)
    try:
        kids = _wait_for(lambda: (lambda d: d if len(d) >= at_least else None)(_descendants(proc.pid)), 120,
                         f"{at_least} child processes of the lab")
        time.sleep(1.0)
        kids |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait_for(lambda: not _alive(kids), 20, f"the children {sorted(_alive(kids))} to die with their parent")
    finally:
        for p in _alive(_descendants(proc.pid) | {proc.pid}):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_second_run_on_one_directory_is_refused_and_a_killed_runs_temporaries_are_cleaned(tmp_path, capsys):
    proc = _start(tmp_path, "--only", "cnn")
    run_dir = tmp_path / "quick-2seeds-mnist"
    try:
        _wait_for(lambda: (run_dir / ".lock").exists() and (run_dir / ".lock").read_text().strip(), 120,
                  "the first run to take its lock")
        code = cli.main(["--quick", "--no-progress", "--only", "what-ln-computes", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by another `layernorm lab` (pid {proc.pid})" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # what a kill between a temporary write and its rename leaves behind
    for name in ("results.json.tmp4242", ".report.md.4242-abc_1.tmp", "figures/cnn.png.tmp.png"):
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_text("half a file")
    code = cli.main(["--quick", "--no-progress", "--only", "what-ln-computes", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0 and "removed 3 temporary file(s)" in err
    assert [p.name for p in run_dir.rglob("*tmp*")] == []
    assert (run_dir / "results.json").exists()
