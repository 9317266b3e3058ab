"""The local runner under faults: kill -9 and resume, a concurrent resume, a step over its time
limit, Ctrl-C during Tune, a resumed Register, and machine errors as one line."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runner_dags
from waiting import wait_for
from pipeline.local.runner import LocalRun, RunLocked, os_problem

SCRIPT = Path(runner_dags.__file__)


def start(kind: str, root: Path, home: Path, *resume: str) -> subprocess.Popen:
    env = {**os.environ, "FAULT_ROOT": str(root), "INVMON_HOME": str(home)}
    return subprocess.Popen([sys.executable, str(SCRIPT), kind, str(root), str(home), *resume],
                            env=env, stdout=subprocess.PIPE, text=True)


def job_pids(root: Path) -> list[int]:
    folder = root / "pids"
    return sorted(int(p.name) for p in folder.iterdir()) if folder.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture
def fault(tmp_path, monkeypatch):
    root, home = tmp_path / "scripts", tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("FAULT_ROOT", str(root))
    monkeypatch.setenv("INVMON_HOME", str(home))
    return root, home


def test_kill_9_mid_step_then_resume_stops_the_orphan_and_finishes(fault):
    root, home = fault
    runner = start("wait", root, home)
    run_id = runner.stdout.readline().strip()
    wait_for(lambda: job_pids(root), what="the step to start")
    orphan = job_pids(root)[0]
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert alive(orphan), "the step's script runs in its own session and outlives the runner"

    (root / "go-processing").touch()
    state = LocalRun.load(home, runner_dags.dag("wait", root), run_id, echo=lambda line: None).execute()
    assert state["status"] == "Succeeded", state.get("failure")
    wait_for(lambda: not alive(orphan), timeout=10, what="the orphan to be stopped")


def test_a_second_executor_of_the_same_run_is_refused(fault):
    root, home = fault
    run = LocalRun.create(home, runner_dags.dag("wait", root), runner_dags.PARAMS, "test",
                          echo=lambda line: None)
    worker = threading.Thread(target=run.execute)
    worker.start()
    try:
        wait_for(lambda: job_pids(root), what="the step to start")
        again = LocalRun.load(home, runner_dags.dag("wait", root), run.state["id"], echo=lambda line: None)
        with pytest.raises(RunLocked, match=f"run {run.state['id']} is executing now \\(pid {os.getpid()}\\)"):
            again.execute()
    finally:
        (root / "go-processing").touch()
        worker.join(60)
    assert run.state["status"] == "Succeeded"


def test_a_step_over_its_time_limit_is_stopped_with_a_clear_reason(fault):
    root, home = fault
    started = time.monotonic()
    state = LocalRun.create(home, runner_dags.dag("timeout", root), runner_dags.PARAMS, "test",
                            echo=lambda line: None).execute()
    assert time.monotonic() - started < 30
    assert state["status"] == "Failed"
    assert "main.py ran past its MaxRuntimeInSeconds of 2 s and was stopped" in state["failure"]
    wait_for(lambda: not any(alive(p) for p in job_pids(root)), timeout=10, what="the job to end")


@pytest.mark.slow
def test_ctrl_c_during_tune_leaves_no_trial_process_behind(fault):
    root, home = fault
    (root / "go-processing").touch()
    runner = start("tune", root, home)
    run_id = runner.stdout.readline().strip()
    # Wait and the two parallel trials: three scripts started, two of them still running.
    wait_for(lambda: len(job_pids(root)) >= 3 and sum(alive(p) for p in job_pids(root)) >= 2,
             what="two trials running at once")
    trials = [p for p in job_pids(root) if alive(p)]
    runner.send_signal(signal.SIGINT)
    assert runner.wait(60) == 130
    wait_for(lambda: not any(alive(p) for p in trials), timeout=10, what="every trial to stop")
    state = json.loads((home / "runs" / run_id / "run.json").read_text())
    assert state["status"] == "Stopped" and state["steps"]["Tune"]["status"] == "Stopped"


def test_a_resumed_register_does_not_register_the_same_run_twice(tmp_path, invmon_home, monkeypatch):
    from test_runner import small_dag

    from pipeline.registry.local import open_registry

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"x")
    monkeypatch.setenv("RUN_COUNTER", str(tmp_path / "count-runs"))
    monkeypatch.setenv("FAIL_FLAG", str(tmp_path / "fail-flag"))
    params = {"InputDataUrl": str(data), "ManifestUrl": "", "Tag": "t1", "Lr": 0.06, "Threshold": 0.5,
              "Group": "toy", "Status": "PendingManualApproval", "Endpoint": "toy-staging"}
    dag = small_dag(tmp_path / "scripts")
    run = LocalRun.create(invmon_home, dag, params, "test", echo=lambda line: None)
    assert run.execute()["status"] == "Succeeded"
    # As if the runner had been killed after registering, before recording it.
    for name in ("Register", "Deploy"):
        run.state["steps"][name] = {"status": "Executing"}
    run.state["status"] = "Failed"
    run.save()
    again = LocalRun.load(invmon_home, dag, run.state["id"], echo=lambda line: None).execute()
    assert again["status"] == "Succeeded"
    versions = open_registry(invmon_home).list_versions("toy")
    assert [v.version for v in versions] == [1]
    assert again["steps"]["Register"]["properties"]["version"] == 1


def test_disk_full_and_permission_errors_are_one_clear_line():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.tar.gz")
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/runs/x")
    assert os_problem(full) == ("the disk is full (/runs/x/model.tar.gz): free space or fix "
                                "permissions, then --resume")
    assert os_problem(wrapped).startswith("permission denied (/runs/x)")
    assert os_problem(ValueError("a step's own error")) is None


def test_resume_never_signals_a_process_it_did_not_start(fault):
    """run.json names process groups by pid and start time; a pid now worn by another process
    (pid reuse), or recorded without its start time, is left alone. A finished job's group is
    forgotten as soon as it ends."""
    import psutil

    root, home = fault
    (root / "go-processing").touch()
    run = LocalRun.create(home, runner_dags.dag("wait", root), runner_dags.PARAMS, "test",
                          echo=lambda line: None)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                 start_new_session=True)  # its own group: killpg would reach it
    try:
        started = psutil.Process(bystander.pid).create_time()
        step = next(iter(run.state["steps"].values()))
        step["process_groups"] = [{"pgid": bystander.pid, "started": started - 3600},  # pid reused
                                  bystander.pid]  # an older run.json: no start time
        run.save()
        lines = []
        state = LocalRun.load(home, runner_dags.dag("wait", root), run.state["id"], echo=lines.append).execute()
        assert state["status"] == "Succeeded", state.get("failure")
        assert alive(bystander.pid)
        assert any(f"not stopping process group {bystander.pid}: its number now belongs to a process "
                   "this run did not start" in line for line in lines)
        assert any(f"not stopping process group {bystander.pid}: recorded by an older invmon" in line
                   for line in lines)
        saved = json.loads((home / "runs" / run.state["id"] / "run.json").read_text())
        assert all("process_groups" not in s for s in saved["steps"].values())  # ended jobs forgotten
    finally:
        bystander.kill()
        bystander.wait()


def test_a_job_about_to_start_when_the_stop_comes_never_starts(tmp_path):
    """Ctrl-C while a tuner's thread is starting a trial: stop_all has signalled every job it saw,
    so the trial it did not see must not start at all (the stopped runner would wait for it)."""
    from pipeline.local import jobs
    from steps.base import Code

    (tmp_path / "job").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "job" / "job.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = Code("job", "job.py", root=tmp_path)

    def start(name: str):
        (tmp_path / name).mkdir()
        return jobs.run_script(Path(sys.executable), code, tmp_path / name, [], {}, tmp_path / name / "log.txt")

    try:
        jobs.stop_all(grace_s=0)
        with pytest.raises(jobs.JobNotStarted, match="job.py was not started: the run is stopping"):
            start("refused")
        assert not marker.exists()
    finally:
        jobs.accept_jobs()
    start("accepted")  # the next run starts jobs again
    assert marker.exists()


def test_a_job_that_starts_while_the_stop_runs_is_ended_at_once(tmp_path, monkeypatch):
    """The stop lands between the job's process start and its registration: the job ends it
    itself instead of running on unseen."""
    from pipeline.local import jobs
    from steps.base import Code

    (tmp_path / "job").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "job" / "job.py").write_text(f"import time\ntime.sleep(30)\nopen({str(marker)!r}, 'w').close()\n")
    real_popen = subprocess.Popen
    started = []

    def popen_then_stop(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        jobs.stop_all(grace_s=0)  # as the signal handler would, before the job is registered
        return proc

    monkeypatch.setattr(jobs.subprocess, "Popen", popen_then_stop)
    begun = time.monotonic()
    try:
        with pytest.raises(jobs.JobNotStarted, match="job.py was stopped as it started"):
            jobs.run_script(Path(sys.executable), Code("job", "job.py", root=tmp_path), tmp_path / "w", [], {},
                            tmp_path / "log.txt")
    finally:
        jobs.accept_jobs()
    assert time.monotonic() - begun < 20 and started[0].poll() is not None and not marker.exists()
    assert started[0].pid not in jobs.live_process_groups()
