"""The end-of-run summary: what a user wants to know once `invmon run` stops."""
from __future__ import annotations

import json
from pathlib import Path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def report_path(state: dict, run_dir: Path) -> Path | None:
    """The Evaluate step's report.html of a run, when it was written."""
    output = state["steps"].get("Evaluate", {}).get("outputs", {}).get("evaluation")
    path = run_dir / "Evaluate" / output / "report.html" if output else None
    return path if path and path.is_file() else None


def summarize(state: dict, run_dir: Path) -> str:
    steps = state["steps"]
    lines = [f"Run {state['id']}: {state['status']} (profile {state['profile']})"]
    if state.get("failure"):
        lines.append(f"  failure: {state['failure']}")

    report = None
    outputs = steps.get("Preprocess", {}).get("outputs", {})
    if "report" in outputs:
        report = _read_json(run_dir / "Preprocess" / outputs["report"] / "data_report.json")
    if report:
        for split, counts in report.get("counts", {}).items():
            per_class = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k != "total")
            lines.append(f"  data {split:<10} {counts['total']:>6} photos  ({per_class})")
        rejected = report.get("rejections_by_kind") or {}
        if rejected:
            shown = ", ".join(f"{kind} {n}" for kind, n in sorted(rejected.items()))
            lines.append(f"  data rejected   {sum(rejected.values()):>6} photos ({shown}; reasons in "
                         f"{run_dir / 'Preprocess' / outputs['report'] / 'data_report.json'})")

    tune = steps.get("Tune", {}).get("properties", {})
    if tune.get("TunedHyperParameters"):
        lines.append(f"  best hyperparameters {tune['TunedHyperParameters']} "
                     f"(validation accuracy {tune['BestObjective']:.4f}, {tune['Trials']} trials)")

    evaluation = steps.get("Evaluate", {}).get("properties", {}).get("EvaluationReport")
    if evaluation:
        accuracy = evaluation["multiclass_classification_metrics"]["accuracy"]["value"]
        rmse = evaluation["regression_metrics"]["rmse"]["value"]
        lines.append(f"  test accuracy {accuracy:.4f}   test RMSE {rmse:.4f}")
        per_count = evaluation.get("per_class") or {}
        if per_count:
            shown = "  ".join(f"{count}: {m['accuracy']:.3f}" if m.get("accuracy") is not None else f"{count}: -"
                              for count, m in per_count.items())  # "-": no test photo of that count
            lines.append(f"  test accuracy per count  {shown}")
        baselines = evaluation.get("constant_answer_baselines")
        if baselines:
            lines.append(f"  a constant answer: always {baselines['majority']['answer']} scores accuracy "
                         f"{baselines['majority']['accuracy']:.4f}, always {baselines['lowest_rmse']['answer']} "
                         f"RMSE {baselines['lowest_rmse']['rmse']:.4f}")
        robustness = evaluation.get("robustness") or {}
        if robustness:
            shown = "  ".join(f"{name} {m['accuracy']:.3f}" for name, m in robustness.items())
            lines.append(f"  accuracy under corruptions: {shown}")
        rules = (evaluation.get("debugger_rules") or {}).get("verdicts") or []
        if rules:
            lines.append("  debugger rules: " + ", ".join(f"{v['rule']} {v['status']}" for v in rules))
    report = report_path(state, run_dir)
    if report:
        lines.append(f"  evaluation report: {report.resolve().as_uri()}")

    condition = steps.get("CheckAccuracy", {}).get("properties")
    if condition:
        verdict = "passed" if condition["outcome"] else "FAILED"
        lines.append(f"  accuracy gate {verdict}: {condition['left']:.4f} >= {condition['right']}")

    registered = steps.get("Register", {}).get("properties")
    if registered:
        lines.append(f"  registered model {registered['group']} version {registered['version']} "
                     f"({registered['status']})")
    deployed = steps.get("Deploy", {}).get("properties")
    if deployed:
        lines.append(f"  staging endpoint {deployed['endpoint']} -> version {deployed['version']} "
                     f"(serve it: invmon serve --endpoint {deployed['endpoint']})")

    took = sum(s.get("seconds", 0) for s in steps.values())
    lines.append(f"  step time {took:.0f}s; artifacts and logs in {run_dir}")
    if state["status"] == "Failed" and state.get("resumable", True):
        lines.append(f"  resume from the failed step: invmon run --resume {state['id']}")
    return "\n".join(lines)
