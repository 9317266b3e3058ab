"""`invmon runs compare A B`: two local runs side by side, from their run.json and folders.

Four sections, each a list of rows (name, the value in A, the value in B, whether they differ):
- parameters: every parameter either run had;
- code: the commit (and whether the tree was dirty, and any tree a resume went on from);
- data: the manifest's SHA-256, the splits' SHA-256 (Preprocess's indexes: every kept photo's id,
  count and md5) and the photos per split and count;
- metrics: Evaluate's test accuracy, RMSE and accuracy per count.
A value a run does not have (a step it never reached) is None, shown as "-".
"""
from __future__ import annotations

from pathlib import Path

from pipeline import lineage

SECTIONS = ("parameters", "code", "data", "metrics")


def run_facts(state: dict, run_dir: Path) -> dict[str, dict[str, object]]:
    """section -> name -> value for one run."""
    record = state.get("lineage") or {}
    git = record.get("git") or {}
    if git.get("commit"):
        commit = lineage.commit_value(git)
    else:
        commit = f"none ({git.get('reason', 'not recorded')})"
    code = {"commit": commit,
            "resumed at": ", ".join(lineage.commit_value(g) or "none" for g in record.get("resumed_at", [])) or None}

    preprocess = state["steps"].get("Preprocess", {})
    data_found = lineage.split_data(run_dir / "Preprocess", preprocess.get("outputs", {})) \
        if preprocess.get("status") == "Succeeded" else {}
    data_found = data_found or record.get("data") or {}
    data: dict[str, object] = {"manifest sha256": record.get("manifest_sha256"),
                               "splits sha256": data_found.get("sha256")}
    for split, counts in (data_found.get("counts") or {}).items():
        per_count = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k != "total")
        data[f"{split} photos"] = f"{counts.get('total')} ({per_count})"

    evaluation = state["steps"].get("Evaluate", {}).get("properties", {}).get("EvaluationReport") or {}
    metrics: dict[str, object] = {
        "accuracy": _value(evaluation, "multiclass_classification_metrics", "accuracy", "value"),
        "rmse": _value(evaluation, "regression_metrics", "rmse", "value"),
    }
    for label, scores in sorted((evaluation.get("per_class") or {}).items()):
        metrics[f"accuracy count {label}"] = (scores or {}).get("accuracy")
    return {"parameters": dict(state.get("parameters") or {}), "code": code, "data": data, "metrics": metrics}


def _value(document: dict, *path: str):
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def compare(a: tuple[dict, Path], b: tuple[dict, Path]) -> dict:
    """The comparison document (`runs compare --json`)."""
    facts = [run_facts(state, folder) for state, folder in (a, b)]
    rows = []
    for section in SECTIONS:
        names = list(dict.fromkeys([*facts[0][section], *facts[1][section]]))
        for name in names:
            left, right = facts[0][section].get(name), facts[1][section].get(name)
            rows.append({"section": section, "name": name, "a": left, "b": right, "differs": left != right})
    return {"a": a[0]["id"], "b": b[0]["id"], "rows": rows,
            "differences": [f"{r['section']}.{r['name']}" for r in rows if r["differs"]]}


def shown(value, section: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and section == "metrics":
        return f"{value:.4f}"
    return str(value)


def table(document: dict) -> str:
    """The side-by-side text: a `*` marks each row whose values differ."""
    rows = document["rows"]
    width = max([len(r["name"]) for r in rows] + [10])
    left = max([len(shown(r["a"], r["section"])) for r in rows] + [len(document["a"])])
    lines = [f"  {'':<{width}}  {document['a']:<{left}}  {document['b']}"]
    for section in SECTIONS:
        lines.append(f"{section}:")
        lines += [f"{'*' if r['differs'] else ' '} {r['name']:<{width}}  {shown(r['a'], section):<{left}}  "
                  f"{shown(r['b'], section)}"
                  for r in rows if r["section"] == section]
    count = len(document["differences"])
    lines.append(f"{count} difference{'s' if count != 1 else ''} (marked *)")
    return "\n".join(lines)
