"""The local runner and the registry around Evaluate and Register: the Evaluate job gets the
local registry's versions of its group (what the SageMaker job reads through boto3), and the
Register step records the run's report.html with the version, which `invmon models show` names."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from conftest import import_script
from pipeline.dag.compile import compile_dag
from pipeline.digests import file_sha256
from pipeline.registry.local import REPORT_PROPERTY, open_registry
from steps.base import Dag, Param

# What a run adds for lineage (pipeline/lineage.py; tests/test_lineage.py checks their values).
LINEAGE_PROPERTIES = ("CommitId", "GitCommitMissing", "GitResumedAt", "DataManifestSha256", "DataSha256",
                      "Parameters")
from test_runner import new_run, setup, small_dag, write_script  # noqa: F401 (setup is a fixture)

EVAL_READING_THE_REGISTRY = """
import argparse, json, os, pathlib, tarfile
p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--output"); p.add_argument("--model-package-group")
a = p.parse_args()
with tarfile.open(pathlib.Path(a.model) / "model.tar.gz") as tar:
    weights = json.load(tar.extractfile("weights.json"))
listing = json.loads(pathlib.Path(os.environ["INVMON_MODEL_REGISTRY"]).read_text())
out = pathlib.Path(a.output)
(out / "evaluation.json").write_text(json.dumps({
    "multiclass_classification_metrics": {"accuracy": {"value": weights["lr"] * 10}},
    "regression_metrics": {"rmse": {"value": 1.0}}, "group": a.model_package_group, "listing": listing}))
(out / "report.html").write_text(f"<p>lr {weights['lr']}, saw versions {[v['version'] for v in listing['versions']]}</p>")
"""


def registry_dag(root: Path) -> Dag:
    base = small_dag(root)
    evaluate = dataclasses.replace(
        base["Evaluate"], code=write_script(root, "evaluate-registry", EVAL_READING_THE_REGISTRY),
        arguments=(*base["Evaluate"].arguments, "--model-package-group", Param("Group")),
        reads_registry=Param("Group"), cache=True)  # cache=True must not reuse: the registry changed
    register = dataclasses.replace(base["Register"], report_file="report.html")
    return Dag(tuple({"Evaluate": evaluate, "Register": register}.get(s.name, s) for s in base.steps))


def path_of(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(unquote(urlparse(uri).path))


def test_evaluate_sees_the_registry_and_register_keeps_each_runs_report(setup, capsys):
    tmp_path, home, _ = setup
    dag = registry_dag(tmp_path / "scripts")
    first = new_run(setup, dag).execute()
    assert first["status"] == "Succeeded", first["failure"]
    seen = first["steps"]["Evaluate"]["properties"]["EvaluationReport"]
    assert seen["group"] == "toy" and seen["listing"] == {"group": "toy", "versions": []}

    registry = open_registry(home)
    v1 = registry.get("toy", 1)
    report1 = path_of(v1.properties[REPORT_PROPERTY])
    assert report1.read_text() == "<p>lr 0.06, saw versions []</p>"
    assert first["steps"]["Register"]["properties"]["report"] == v1.properties[REPORT_PROPERTY]
    registry.set_status("toy", 1, "Approved")

    second = new_run(setup, dag).execute()  # the same inputs: only the registry differs
    assert second["status"] == "Succeeded", second["failure"]
    assert "reused_from" not in second["steps"]["Evaluate"]
    listing = second["steps"]["Evaluate"]["properties"]["EvaluationReport"]["listing"]
    assert [(v["version"], v["status"]) for v in listing["versions"]] == [(1, "Approved")]
    assert listing["versions"][0]["evaluation"] == v1.metrics  # what was registered, in full
    # The Evaluate script's own rule, on the listing the runner wrote: version 1 to compare with.
    previous = import_script("evaluate", "previous")
    written = home / "runs" / second["id"] / "Evaluate" / "registry.json"
    found, _ = previous.from_listing(written, "toy")
    assert (found["version"], found["status"], found["metrics"]["accuracy"]) == (1, "Approved", 0.6)

    report2 = path_of(registry.get("toy", 2).properties[REPORT_PROPERTY])
    assert report2 != report1 and report2.read_text() == "<p>lr 0.06, saw versions [1]</p>"
    assert report1.is_file()  # the first version's report is still its own

    from pipeline.cli import main

    assert main(["models", "show", "1", "--group", "toy"]) == 0
    out = capsys.readouterr().out
    assert f"evaluation report: {report1.as_uri()}" in out.splitlines()
    shown = json.loads(out[:out.rindex("}") + 1])["properties"]
    assert {k: shown[k] for k in (REPORT_PROPERTY, "ArtifactSha256")} == {
        REPORT_PROPERTY: report1.as_uri(), "ArtifactSha256": file_sha256(registry.get("toy", 1).artifact_uri)}
    assert set(shown) - {REPORT_PROPERTY, "ArtifactSha256"} <= set(LINEAGE_PROPERTIES)  # and the lineage
    report1.unlink()
    assert main(["models", "show", "1", "--group", "toy"]) == 0
    assert "(missing: the file was removed)" in capsys.readouterr().out


def test_a_step_that_does_not_read_the_registry_gets_no_listing(setup):
    tmp_path, home, _ = setup
    state = new_run(setup).execute()  # test_runner's DAG: no reads_registry, no report_file
    assert state["status"] == "Succeeded", state["failure"]
    assert not (home / "runs" / state["id"] / "Evaluate" / "registry.json").exists()
    registered = open_registry(home).get("toy", 1)  # no report; the artifact's digest, always
    assert registered.properties["ArtifactSha256"] == file_sha256(registered.artifact_uri)
    assert set(registered.properties) - {"ArtifactSha256"} <= set(LINEAGE_PROPERTIES)


def test_a_step_that_reads_the_registry_is_never_taken_from_the_cache(setup):
    """Same code, arguments and inputs, but another registry: an earlier result must not be reused."""
    tmp_path, _, _ = setup
    dag = registry_dag(tmp_path / "scripts")
    run = new_run(setup, dag)
    requests = {r.name: r for r in compile_dag(dag, run.params)}
    plain_dag = Dag(tuple(dataclasses.replace(s, reads_registry=None) if s.name == "Evaluate" else s
                          for s in dag.steps))
    reads, plain = requests["Evaluate"], {r.name: r for r in compile_dag(plain_dag, run.params)}["Evaluate"]
    (run.dir / "Evaluate").mkdir(parents=True)
    inputs, settings = {"model": tmp_path / "data"}, {"arguments": []}
    record = {}
    assert not run._cached(plain, record, settings, inputs)
    run._remember(plain, record)
    later = new_run(setup, dag)
    assert not later._cached(reads, {}, settings, inputs)  # reading the registry: never reused...
    assert later._cached(plain, {}, settings, inputs)  # ...though the same step without it is
