"""report.html of a monitor run: one self-contained page (plots as inline PNG, nothing fetched).

The verdicts table, then one plot per test: the answered counts (baseline vs window shares), each
image statistic (the two empirical distribution functions whose largest gap is the KS statistic),
the embeddings (the first two PCA components of both samples, and the permutation null of the MMD
with the observed value).
"""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REFERENCE, WINDOW = "#4c72b0", "#dd8452"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _counts(plot: dict) -> str:
    labels = sorted(set(plot["reference"]) | set(plot["window"]), key=float)
    ref = np.array([plot["reference"].get(label, 0) for label in labels], float)
    win = np.array([plot["window"].get(label, 0) for label in labels], float)
    figure, axis = plt.subplots(figsize=(5, 2.8))
    x = np.arange(len(labels))
    axis.bar(x - 0.2, ref / max(ref.sum(), 1), 0.4, label="baseline", color=REFERENCE)
    axis.bar(x + 0.2, win / max(win.sum(), 1), 0.4, label="window", color=WINDOW)
    axis.set_xticks(x, labels)
    axis.set_xlabel("answered count")
    axis.set_ylabel("share")
    axis.legend()
    return _png(figure)


def _ecdf(name: str, plot: dict) -> str:
    figure, axis = plt.subplots(figsize=(5, 2.8))
    for values, label, colour in ((plot["reference"], "baseline", REFERENCE), (plot["window"], "window", WINDOW)):
        values = np.sort(np.asarray(values, float))
        axis.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label, color=colour)
    axis.set_xlabel(name)
    axis.set_ylabel("share of photos at or under")
    axis.legend()
    return _png(figure)


def _embeddings(plot: dict) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    reference, window = plot["reference"], plot["window"]
    if reference.shape[1] >= 2:
        left.scatter(reference[:, 0], reference[:, 1], s=6, alpha=0.5, label="baseline", color=REFERENCE)
        left.scatter(window[:, 0], window[:, 1], s=6, alpha=0.5, label="window", color=WINDOW)
        left.set_xlabel("PCA 1")
        left.set_ylabel("PCA 2")
        left.legend()
    right.hist(plot["null"], bins=40, color="#999999", label="permuted (no drift)")
    right.axvline(plot["statistic"], color=WINDOW, label="this window")
    right.set_xlabel("MMD²")
    right.legend()
    return _png(figure)


def render(result: dict, plots: dict) -> str:
    esc = html.escape
    rows = []
    for name, test in result["tests"].items():
        def number(value, spec=".4g"):
            return "-" if value is None else format(value, spec)
        rows.append(f"<tr class='{test['verdict']}'><td>{esc(name)}</td><td>{esc(test['kind'])}</td>"
                    f"<td>{number(test['statistic'])}</td><td>{number(test['critical_statistic'])}</td>"
                    f"<td>{number(test['p_value'], '.3g')}</td><td>{number(test['threshold'], '.3g')}</td>"
                    f"<td>{test['window_size']}</td><td>{test['reference_size']}</td>"
                    f"<td><b>{esc(test['verdict'])}</b> {esc(test['detail'].get('reason', ''))}</td></tr>")
    sections = []
    if "predicted_counts" in plots:
        sections.append(("Answered counts", _counts(plots["predicted_counts"])))
    if "embeddings" in plots:
        sections.append(("Embeddings (projected by the baseline's PCA)", _embeddings(plots["embeddings"])))
    for name in result["tests"]:
        if name in plots and name not in ("embeddings", "predicted_counts"):
            sections.append((f"Image statistic: {name}", _ecdf(name, plots[name])))
    window = result["window"]
    verdict = ("DRIFT in " + ", ".join(result["drifted"])) if result["drift"] else "no drift"
    body = "".join(f"<h2>{esc(title)}</h2>{image}" for title, image in sections)
    model = esc(str(result["model"]["model_id"]))
    if result["model"]["model_version"]:
        model += " version " + esc(result["model"]["model_version"])
    sources = esc(", ".join(f"{k}: {v}" for k, v in window["by_source"].items()) or "none")
    made = result["baseline"].get("made") or {}
    intro = (f"Model {model}; {window['requests']} requests from {esc(str(window['first']))} to "
             f"{esc(str(window['last']))} ({sources}); baseline made {esc(str(made.get('time')))} from "
             f"{made.get('photos')} test photos. Each test calls drift when its p-value is under alpha "
             f"{result['alpha']} divided by the number of tests with data.")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,td:last-child{text-align:left}tr.drift{background:#fde0dc}tr.no_data{color:#888}")
    header = ("<tr><th>test</th><th>kind</th><th>statistic</th><th>critical</th><th>p-value</th>"
              "<th>threshold</th><th>window</th><th>baseline</th><th>verdict</th></tr>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>Monitor: {esc(verdict)}</title>'
            f"<style>{style}</style></head><body>\n<h1>Monitor: {esc(verdict)}</h1>\n<p>{intro}</p>\n"
            f"<table>{header}{''.join(rows)}</table>\n{body}</body></html>\n")
