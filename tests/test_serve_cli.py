"""`invmon serve`: which folder an endpoint captures into, and the capture options' checks.
(What the capture writes, and that it never fails a request: tests/test_capture.py.)"""
from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.registry.local import open_registry


@pytest.fixture
def served(invmon_home, tiny_artifact, monkeypatch):
    """The staging endpoint serves a registered tiny model; serve() records its settings."""
    registry = open_registry(invmon_home)
    version = registry.register("bin-count", str(tiny_artifact), {"accuracy": 0.5},
                                status="PendingManualApproval", run_id="r1")
    registry.deploy("bin-count-staging", "bin-count", version.version, require_approved=False)
    seen = {}

    def fake_serve(artifact, host, port, model_version, settings):
        seen.update(artifact=artifact, settings=settings)
        return 0

    monkeypatch.setattr("pipeline.serving.http_server.serve", fake_serve)
    return invmon_home, seen


def test_an_endpoint_captures_into_its_own_folder_by_default(served):
    home, seen = served
    assert main(["serve"]) == 0
    assert seen["settings"].capture_dir == str(home / "capture" / "bin-count-staging")
    assert (seen["settings"].capture_sample, seen["settings"].capture_body_sample) == (1.0, 0.0)


def test_capture_can_be_moved_sampled_or_turned_off(served, tmp_path):
    _, seen = served
    assert main(["serve", "--capture", str(tmp_path / "c"), "--capture-sample", "0.25",
                 "--capture-body-sample", "0.1"]) == 0
    settings = seen["settings"]
    assert (settings.capture_dir, settings.capture_sample, settings.capture_body_sample) == (
        str(tmp_path / "c"), 0.25, 0.1)
    assert main(["serve", "--no-capture"]) == 0 and seen["settings"].capture_dir == ""
    assert main(["serve", "--version", "1"]) == 0 and seen["settings"].capture_dir == ""


def test_a_share_out_of_range_is_a_usage_error(served, capsys):
    assert main(["serve", "--capture-sample", "1.5"]) == 2
    assert "shares from 0 to 1, got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # one or the other: argparse's own usage error
        main(["serve", "--capture", "x", "--no-capture"])
    assert exited.value.code == 2
