"""`invmon monitor`: an endpoint's capture against the baseline registered with the version it
serves, through the monitor's own step container; drift is alerted. (The tests themselves and
the capture formats: tests/test_monitor.py.)"""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli import main
from pipeline.registry.local import BASELINE_PROPERTY, open_registry
from test_monitor import windows, world  # noqa: F401 (fixtures)


@pytest.fixture
def endpoint(world, invmon_home):
    """bin-count-staging serves the monitored model, registered with its baseline."""
    registry = open_registry(invmon_home)
    version = registry.register("bin-count", str(world["artifact"]), {"accuracy": 0.5}, run_id="r1",
                                status="PendingManualApproval",
                                properties={BASELINE_PROPERTY: world["baseline"].resolve().as_uri()})
    registry.deploy("bin-count-staging", "bin-count", version.version, require_approved=False)
    return invmon_home


def captured(home, source):
    shutil.copytree(source, home / "capture" / "bin-count-staging")


@pytest.mark.slow
def test_a_darkened_window_is_drift_and_is_alerted(endpoint, windows, notifications_log, capsys):
    captured(endpoint, windows["dark"])
    assert main(["monitor", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drift"] and "brightness" in result["drifted"]
    (alert,) = [json.loads(line) for line in notifications_log.read_text().splitlines()]
    assert alert["kind"] == "drift" and alert["endpoint"] == "bin-count-staging" and alert["version"] == 1
    assert main(["monitor", "--fail-on-drift"]) == 3
    assert "DRIFT in" in capsys.readouterr().out


@pytest.mark.slow
def test_the_same_kind_of_photos_is_quiet(endpoint, windows, notifications_log, capsys):
    captured(endpoint, windows["same"])
    assert main(["monitor", "--fail-on-drift"]) == 0
    out = capsys.readouterr().out
    assert "no drift" in out and "report: " in out
    assert not notifications_log.exists()


@pytest.mark.slow
def test_what_is_missing_is_said_in_one_line(endpoint, world, capsys):
    assert main(["monitor"]) == 1
    assert "no capture at" in capsys.readouterr().err
    assert main(["monitor", "--version", "1"]) == 2
    assert "give --capture DIR" in capsys.readouterr().err
    registry = open_registry(endpoint)
    registry.register("bin-count", str(world["artifact"]), {"accuracy": 0.5}, run_id="r2",
                      status="PendingManualApproval")
    assert main(["monitor", "--version", "2", "--capture", str(endpoint)]) == 1
    assert "bin-count/2 has no monitoring baseline" in capsys.readouterr().err
