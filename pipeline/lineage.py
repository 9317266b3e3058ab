"""What made a model version: the commit of the code, the data and its selection, the parameters
and the run (or pipeline execution) that trained it.

Both back-ends keep it with the version, each within what it can store:
- the commit is the CommitId pipeline parameter (`<sha>` or `<sha>-dirty`), which the Register
  request sends as MetadataProperties.CommitId. A local run fills it from the working tree
  (`git_state`); `invmon upsert` from CODEBUILD_RESOLVED_SOURCE_VERSION, else its own tree, since
  the code an execution runs is the code upsert uploaded;
- the run is MetadataProperties.GeneratedBy (the local run id, or the execution's ARN);
- the selection (InputDataUrl, ManifestUrl, SelectCounts, PerCount, Seed) is the package's
  description, `run <id>; Name=value; ...` (its values may hold commas, which
  CustomerMetadataProperties refuses);
- the local registry adds what only a local run knows to the version's properties: the
  manifest's and the split's SHA-256, every parameter, and why a commit is missing. On SageMaker
  the parameters are the execution's own (`invmon models show` reads them from it).

`record()` reads it back from either back-end into one shape (`ModelVersion.lineage`).
Reading git never fails a run: without a checkout the commit is absent, with the reason.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from pipeline.digests import file_sha256, named_files_sha256
from pipeline.registry.local import COMMIT_PROPERTY

ROOT = Path(__file__).resolve().parent.parent  # the tree the running code came from
COMMIT_PARAMETER = "CommitId"
DIRTY_SUFFIX = "-dirty"
COMMIT_PATTERN = rf"[0-9a-f]{{7,40}}({DIRTY_SUFFIX})?"
# The data selection the description records, in this order.
SELECTION = ("InputDataUrl", "ManifestUrl", "SelectCounts", "PerCount", "Seed")

# Version properties (local registry), beside COMMIT_PROPERTY (`<sha>` or `<sha>-dirty`; on
# SageMaker MetadataProperties.CommitId; both read back as ModelVersion.commit_id).
NO_COMMIT_PROPERTY = "GitCommitMissing"  # why no commit was recorded
RESUMED_PROPERTY = "GitResumedAt"  # other trees a resumed run went on from, comma-separated
MANIFEST_PROPERTY = "DataManifestSha256"  # the ManifestUrl file's SHA-256
DATA_PROPERTY = "DataSha256"  # Preprocess's split indexes (every photo's id, count and md5)
PARAMETERS_PROPERTY = "Parameters"  # the run's parameters, JSON
GIT_TIMEOUT_S = 10
MAX_DESCRIPTION = 1024  # ModelPackageDescription (botocore's model of CreateModelPackage)
MAX_EXECUTION_ID = 64  # room for the run's id in it
SPLITS = ("train", "validation", "test")


def git_state(root: Path | None = None) -> dict:
    """`{"commit": sha, "dirty": bool}` for the checkout the code runs from (`root`, default
    ROOT), or `{"commit": None, "reason": why}`; never raises. Dirty: anything `git status`
    reports (changed, staged or untracked files that are not ignored)."""
    root = Path(root or ROOT)
    def git(*args: str) -> str:
        # --no-optional-locks: `git status` must not take the index lock of a tree someone
        # may be committing in.
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if done.returncode:
            first = (done.stderr.strip().splitlines() or [f"git {args[0]} exited {done.returncode}"])[0]
            raise RuntimeError(first.removeprefix("fatal: "))
        return done.stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
        if top != root.resolve():  # e.g. an installed package inside some other repository
            return {"commit": None, "reason": f"the code does not run from a git checkout ({root})"}
        commit = git("rev-parse", "HEAD").strip()
        changes = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    except FileNotFoundError:
        return {"commit": None, "reason": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {"commit": None, "reason": f"git did not answer within {GIT_TIMEOUT_S} s"}
    except (RuntimeError, OSError) as exc:
        return {"commit": None, "reason": f"not a git checkout: {exc}"}
    return {"commit": commit, "dirty": bool(changes), "changed_files": len(changes)}


def commit_value(state: dict) -> str:
    """The CommitId parameter's value for a git state: `<sha>`, `<sha>-dirty`, or empty."""
    if not state.get("commit"):
        return ""
    return state["commit"] + (DIRTY_SUFFIX if state.get("dirty") else "")


def parse_commit(value: str | None) -> tuple[str | None, bool | None]:
    """(sha, dirty) from a CommitId value; (None, None) when it is empty."""
    value = (value or "").strip()
    if not value:
        return None, None
    if value.endswith(DIRTY_SUFFIX):
        return value[: -len(DIRTY_SUFFIX)], True
    return value, False


def manifest_sha256(manifest: str | None) -> str | None:
    """The SHA-256 of a local manifest file; None without one (or for an s3:// URI)."""
    text = str(manifest or "").strip()
    if not text or text.startswith("s3://"):
        return None
    path = Path(text).expanduser()
    return file_sha256(path) if path.is_file() else None


def split_data(step_dir: Path, outputs: dict) -> dict:
    """What Preprocess made of the data (its step folder and its run.json outputs): the SHA-256 of
    the split indexes (manifest*.csv: every kept photo's id, count and md5) and the count per
    split and class from data_report.json. Empty when the step wrote neither."""
    found: dict = {}
    files = [(f"{split}/{p.name}", p) for split in SPLITS if split in outputs
             for p in sorted((step_dir / outputs[split]).glob("manifest*.csv"))]
    if files:
        found["sha256"] = named_files_sha256(files)
    report = step_dir / outputs.get("report", "report") / "data_report.json"
    try:
        found["counts"] = json.loads(report.read_text()).get("counts") or {}
    except (OSError, json.JSONDecodeError):
        pass
    return found


def description(run: str, values: dict) -> str:
    """The description a Register request carries, written as the compile stage joins it."""
    return f"run {run}" + "".join(f"; {name}={values[name]}" for name in SELECTION if name in values)


def description_problem(values: dict) -> str | None:
    """Why the description of a run with these parameter values would not fit SageMaker's
    ModelPackageDescription (1,024 characters), which would fail the Register step at the end of
    the run; None when it fits."""
    length = len(description("x" * MAX_EXECUTION_ID, values))
    if length <= MAX_DESCRIPTION:
        return None
    return (f"InputDataUrl and ManifestUrl are too long to record with the model: its description "
            f"would have {length} characters, SageMaker takes {MAX_DESCRIPTION}")


def parse_description(text: str) -> tuple[str | None, dict]:
    """(run, selection) from `description()`'s text; (None, {}) for any other description."""
    if not text.startswith("run "):
        return None, {}
    run, *parts = text[len("run "):].split("; ")
    selection = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep or name not in SELECTION:
            return None, {}
        selection[name] = value
    return run, selection


def of_version(version, parameters: dict | None = None, parameters_missing: str | None = None) -> dict:
    """A registered version's lineage (a ModelVersion of either back-end)."""
    return record(version.commit_id, version.run_id, version.description, version.properties,
                  parameters, parameters_missing)


def record(commit: str | None, run: str | None, description_text: str = "",
           properties: dict | None = None, parameters: dict | None = None,
           parameters_missing: str | None = None) -> dict:
    """One version's lineage, from what either back-end keeps (see the module doc)."""
    properties = properties or {}
    sha, dirty = parse_commit(commit)
    described_run, selection = parse_description(description_text or "")
    if parameters is None and properties.get(PARAMETERS_PROPERTY):
        try:
            parameters = json.loads(properties[PARAMETERS_PROPERTY])
        except json.JSONDecodeError:
            parameters = None
    if not selection and parameters:
        selection = {name: parameters[name] for name in SELECTION if name in parameters}
    resumed = [c for c in properties.get(RESUMED_PROPERTY, "").split(",") if c]
    return {
        "run": run or described_run,
        "commit": sha,
        "dirty": dirty,
        "commit_missing": None if sha else (properties.get(NO_COMMIT_PROPERTY) or "no commit was recorded"),
        "resumed_at": resumed,
        "data": {"manifest_sha256": properties.get(MANIFEST_PROPERTY),
                 "split_sha256": properties.get(DATA_PROPERTY),
                 "selection": selection},
        "parameters": parameters,
        "parameters_missing": None if parameters else (parameters_missing or "not recorded"),
    }


def lines(lineage: dict) -> list[str]:
    """`invmon models show`'s lineage block."""
    if lineage["commit"]:
        commit = lineage["commit"] + (" (dirty: the tree had uncommitted changes)" if lineage["dirty"] else "")
    else:
        commit = f"none ({lineage['commit_missing']})"
    if lineage["resumed_at"]:
        commit += f"; resumed at {', '.join(lineage['resumed_at'])}"
    data = lineage["data"]
    shown = [f"  run          {lineage['run'] or 'unknown'}", f"  commit       {commit}"]
    selection = " ".join(f"{k}={v}" for k, v in data["selection"].items())
    shown.append(f"  selection    {selection or 'not recorded'}")
    if data["manifest_sha256"]:
        manifest = data["manifest_sha256"]
    elif data["selection"].get("ManifestUrl", None) == "":
        manifest = "none (no manifest: every labelled photo of the input)"
    else:
        manifest = "no digest recorded"
    shown.append(f"  manifest     {manifest}")
    if data["split_sha256"]:
        shown.append(f"  splits       {data['split_sha256']}")
    parameters = lineage["parameters"]
    if parameters:
        shown.append("  parameters   " + " ".join(f"{k}={v}" for k, v in sorted(parameters.items())
                                                  if v not in ("", None)))
    else:
        shown.append(f"  parameters   {lineage['parameters_missing']}")
    return ["lineage:", *shown]
