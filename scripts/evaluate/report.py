"""The evaluation report: one self-contained HTML file per run (no network needed to view it).

Plots are drawn with matplotlib and embedded as base64 PNG, test photos as base64 JPEG
thumbnails; there are no external scripts, styles or fonts. Sections: headline metrics against
the gate and the previous registered version on the same photos, per-class table, confusion matrix, loss curves and
the learning rate, Debugger rule verdicts, accuracy under each corruption and its ratio to clean
accuracy, the data report, and a grid of test photos with true and predicted counts, worst mistakes first.

Plain module of the Evaluate step; standard library, numpy, Pillow and matplotlib.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

MAX_PHOTOS = 24
THUMB = 112


class ReportError(Exception):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed in this environment "
                          "(scripts/evaluate/requirements.txt lists it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(src: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{src}" alt="{html.escape(alt)}">'


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- plots

def loss_plot(epochs: list[dict]) -> str:
    """Loss and accuracy per epoch; with several tails (train.py --tails) one pair of lines each."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    members = sorted({e.get("member", 0) for e in epochs})
    for member in members:
        run = [e for e in epochs if e.get("member", 0) == member]
        x, name = [e["epoch"] for e in run], f" (tail {member + 1})" if len(members) > 1 else ""
        for axis, key in ((left, "loss"), (right, "accuracy")):
            axis.plot(x, [e["train"][key] for e in run], "o-", label="train" + name)
            axis.plot(x, [e["validation"][key] for e in run], "s-", label="validation" + name)
    left.set(title="cross-entropy loss", xlabel="epoch")
    left.legend()
    right.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    return _png(fig)


def step_loss_plot(losses: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3))
    for mode, points in sorted(losses.items()):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], ".-", label=mode, markersize=3)
    ax.set(title="loss per step (Debugger)", xlabel="step")
    ax.legend()
    return _png(fig)


def learning_rate_plot(points: list) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=3)
    ax.set(title="learning rate (Debugger, at its save interval)", xlabel="step")
    return _png(fig)


def _learning_rate(points: list) -> str:
    """The plot, and the values themselves (a schedule is easier to check as numbers)."""
    shown = points if len(points) <= 12 else points[:6] + points[-6:]
    listed = ", ".join(f"step {int(s)}: {lr:.3g}" for s, lr in shown)
    more = f" ({len(points)} saved, first and last 6 listed)" if len(points) > 12 else ""
    return _img(learning_rate_plot(points), "learning rate") + f"<p class='note'>Learning rate{more}: {listed}</p>"


def confusion_plot(confusion: dict) -> str:
    plt = _pyplot()
    labels = sorted(confusion, key=int)
    matrix = np.array([[confusion[t].get(p, 0) for p in labels] for t in labels])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted count", ylabel="true count", title="confusion matrix")
    return _png(fig)


def robustness_plot(clean: float, robustness: dict) -> str:
    plt = _pyplot()
    names = ["clean", *robustness]
    values = [clean, *(r["accuracy"] for r in robustness.values())]
    fig, ax = plt.subplots(figsize=(5.5, 3))
    ax.bar(names, values, color=["#4a7"] + ["#c84"] * len(robustness))
    ax.set(ylim=(0, 1), ylabel="accuracy", title="accuracy under corruptions")
    return _png(fig)


def thumbnail(path: Path) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# --------------------------------------------------------------------------- sections

def _previous_name(previous: dict) -> str:
    status = f", {previous['status']}" if previous.get("status") else ""
    return f" ({_e(previous.get('version'))}{_e(status)})"


def _change(difference: dict, better: str) -> str:
    """This run minus the previous version on the same photos, with its paired interval; coloured
    only when the interval leaves out zero."""
    value, (low, high) = difference["value"], difference["interval"]
    cls = "note"
    if low > 0 or high < 0:
        cls = "ok" if (low > 0) == (better == "higher") else "bad"
    return f'<span class="{cls}">{value:+.4f}</span> [{low:+.4f}, {high:+.4f}]'


def _headline(evaluation: dict, threshold: float | None, previous: dict | None, previous_note: str = "") -> str:
    """Metrics against the gate and, on the same photos, the previous version (evaluation.json's
    previous_version). A previous version that was not scored on these photos gets no change
    column: its registered numbers come from other photos."""
    mc = evaluation["multiclass_classification_metrics"]
    rows = [("accuracy", mc["accuracy"], "higher"), ("rmse", evaluation["regression_metrics"]["rmse"], "lower"),
            ("weighted_f1", mc.get("weighted_f1"), "higher")]
    paired = bool(previous) and "difference" in previous
    theirs = (previous or {}).get("these_photos") or {}
    difference = (previous or {}).get("difference") or {}
    head = "<table><tr><th>metric</th><th>this run</th><th>gate</th>"
    if paired:
        head += (f"<th>previous version{_previous_name(previous)} on these photos</th>"
                 "<th>change (this run &minus; previous) [interval]</th>")
    out = [head + "</tr>"]
    for name, value, better in rows:
        if not value:
            continue
        current = value["value"]
        gate = ""
        if name == "accuracy" and threshold is not None:
            passed = current >= threshold
            gate = f'<span class="{"ok" if passed else "bad"}">{"pass" if passed else "FAIL"} (&ge; {threshold})</span>'
        row = f"<tr><td>{name}</td><td>{current:.4f} &plusmn; {value['standard_deviation']:.4f}</td><td>{gate}</td>"
        if paired:
            before = theirs.get(name) or {}
            shown = (f"{before['value']:.4f} &plusmn; {before['standard_deviation']:.4f}"
                     if "value" in before else "-")
            row += f"<td>{shown}</td><td>{_change(difference[name], better) if name in difference else ''}</td>"
        out.append(row + "</tr>")
    out.append("</table>")
    baselines = evaluation.get("constant_answer_baselines")
    if baselines:  # the bar a model must clear to have learnt anything
        majority, lowest = baselines["majority"], baselines["lowest_rmse"]
        out.append(f"<p class='note'>The best a constant answer does on these photos: accuracy "
                   f"{majority['accuracy']:.4f} (always {majority['answer']}), RMSE {lowest['rmse']:.4f} "
                   f"(always {lowest['answer']}).</p>")
    if not previous:
        out.append(f"<p class='note'>No previous registered version to compare with"
                   f"{': ' + _e(previous_note) if previous_note else '.'}</p>")
    elif paired:
        left_out = len(theirs.get("skipped") or [])
        out.append(
            f"<p class='note'>The previous version{_previous_name(previous)} was scored on these "
            f"{difference['photos']} test photos with its own serving code, its artifact checked against the "
            f"SHA-256 recorded at its registration. The change is this run minus the previous version on the "
            f"same photos; the interval is a {_e(difference.get('interval', ''))}. Only this run got "
            f"{difference['only_this_model_right']} of them right, only the previous version "
            f"{difference['only_previous_right']}."
            + (f" {left_out} photos its code could not decode are left out of the comparison." if left_out else "")
            + "</p>")
    else:
        out.append(f"<p class='note'>No change is shown against the previous version{_previous_name(previous)}: "
                   f"{_e(previous.get('note') or previous_note)}.</p>")
        recorded = previous.get("recorded_metrics") or previous.get("metrics") or {}
        if recorded:
            listed = ", ".join(f"{_e(k)} {v:.4f}" for k, v in recorded.items() if isinstance(v, (int, float)))
            out.append(f"<p class='note'>Its metrics as registered, measured on its own test split (other "
                       f"photos, not comparable with this run's): {listed}.</p>")
    return "".join(out)


def _per_class(evaluation: dict) -> str:
    rows = "".join(f"<tr><td>{_e(label)}</td><td>{c['support']}</td><td>{_num(c['accuracy'])}</td>"
                   f"<td>{_num(c['rmse'])}</td></tr>" for label, c in evaluation["per_class"].items())
    table = f"<table><tr><th>count</th><th>photos</th><th>accuracy</th><th>rmse</th></tr>{rows}</table>"
    return table + _decoding(evaluation.get("decoding") or {})


def _decoding(how: dict) -> str:
    """One line on how the counts were decoded: a reviewer reads the end counts' accuracy with it."""
    names = {"mean": "the rounded expected count", "median": "the median count", "argmax": "the most likely count"}
    if how.get("decode") not in names:
        return ""
    text = f"Counts decoded as {names[how['decode']]}"
    if how.get("cuts"):
        text += f", cut on the expected count at {', '.join(f'{c:.4g}' for c in how['cuts'])}"
        if how.get("recall_floor"):
            text += (f" (Train moved the end cuts where count 1 or count 5 was under "
                     f"{how['recall_floor']:g} recall on the validation split; plain rounding cuts at x.5)")
    text += {"flips": ", averaged over the 4 flips", "crops": ", averaged over 5 crops",
             "flips+crops": ", averaged over the 4 flips and 5 crops"}.get(how.get("tta"), "")
    return f"<p class='note'>{_e(text)}.</p>"


def _robustness(evaluation: dict) -> str:
    robustness = evaluation.get("robustness") or {}
    if not robustness:
        return "<p class='note'>No corruptions were scored.</p>"
    clean = evaluation["multiclass_classification_metrics"]["accuracy"]["value"]
    rows = "".join(
        f"<tr><td>{_e(kind)}</td><td>{r['accuracy']:.4f}</td>"
        f"<td>{(r['accuracy'] / clean if clean else float('nan')):.2f}</td><td>{r['rmse']:.4f}</td>"
        f"<td>{_e(', '.join(f'{k}={v}' for k, v in r.get('severity', {}).items()))}</td></tr>"
        for kind, r in robustness.items())
    return (_img(robustness_plot(clean, robustness), "accuracy under corruptions")
            + f"<table><tr><th>corruption</th><th>accuracy</th><th>ratio to clean ({clean:.4f})</th>"
              f"<th>rmse</th><th>severity</th></tr>{rows}</table>")


def _rules(verdicts: list[dict], debugger_note: str) -> str:
    rows = "".join(
        f"<tr><td>{_e(v['rule'])}</td><td class='{ {'IssuesFound': 'bad', 'NoIssuesFound': 'ok'}.get(v['status'], 'note') }'>"
        f"{_e(v['status'])}</td><td>{_e(v['message'])}</td>"
        f"<td>{_e(', '.join(f'{k}={p}' for k, p in v['parameters'].items()))}</td></tr>" for v in verdicts)
    return (f"<p class='note'>{_e(debugger_note)}</p>"
            f"<table><tr><th>rule</th><th>verdict</th><th>why</th><th>parameters</th></tr>{rows}</table>")


def _data_report(report: dict | None) -> str:
    if not report:
        return "<p class='note'>No data report was given to this step.</p>"
    counts = report.get("counts") or {}
    labels = sorted({k for c in counts.values() for k in c if k != "total"}, key=lambda k: (len(k), k))
    head = "".join(f"<th>{_e(k)}</th>" for k in labels)
    rows = "".join(f"<tr><td>{_e(split)}</td>" + "".join(f"<td>{c.get(k, 0)}</td>" for k in labels)
                   + f"<td>{c.get('total', '')}</td></tr>" for split, c in counts.items())
    out = f"<table><tr><th>split</th>{head}<th>total</th></tr>{rows}</table>"
    rejected = report.get("rejections_by_kind") or {}
    if rejected:
        out += "<p>Rejected: " + ", ".join(f"{_e(k)} {n}" for k, n in sorted(rejected.items())) + "</p>"
    else:
        out += "<p>No photos rejected.</p>"
    return out


def _photos(predictions: list[dict], test_dir: Path) -> str:
    ranked = sorted(predictions, key=lambda p: (-abs(int(p["prediction"]) - int(p["label"])), p["path"]))
    cells = []
    for p in ranked[:MAX_PHOTOS]:
        src = thumbnail(test_dir / p["path"])
        if src is None:
            continue
        wrong = int(p["prediction"]) != int(p["label"])
        cells.append(f'<figure class="{"bad" if wrong else "ok"}">{_img(src, p["path"], "photo")}'
                     f'<figcaption>true {p["label"]} &middot; predicted {p["prediction"]}</figcaption></figure>')
    return (f"<p class='note'>{min(len(ranked), MAX_PHOTOS)} of {len(ranked)} test photos, largest error "
            f"first.</p><div class='grid'>{''.join(cells)}</div>")


STYLE = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
.ok{color:#186a2e}.bad{color:#b00020;font-weight:bold}.note{color:#666}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;border:3px solid #ccc;padding:2px}
figure.bad{border-color:#b00020}figure.ok{border-color:#186a2e}figcaption{font-size:.8em}
img.plot{max-width:100%}
"""


def render(evaluation: dict, predictions: list[dict], test_dir: Path, *, history: dict | None = None,
           verdicts: list[dict] | None = None, debugger_note: str = "", debugger_losses: dict | None = None,
           learning_rate: list | None = None,
           data_report: dict | None = None, previous: dict | None = None, previous_note: str = "",
           threshold: float | None = None, title: str = "") -> str:
    epochs = (history or {}).get("epochs") or []
    sections = [
        ("Headline", _headline(evaluation, threshold, previous, previous_note)),
        ("Per class", _per_class(evaluation)),
        ("Confusion matrix", _img(confusion_plot(evaluation["multiclass_classification_metrics"]
                                                 ["confusion_matrix"]), "confusion matrix")),
        ("Loss curves", (_img(loss_plot(epochs), "loss curves") if epochs else
                         "<p class='note'>The model artifact holds no training history.</p>")
         + (_img(step_loss_plot(debugger_losses), "loss per step") if debugger_losses else "")
         + (_learning_rate(learning_rate) if learning_rate else "")),
        ("Debugger rules", _rules(verdicts or [], debugger_note)),
        ("Robustness", _robustness(evaluation)),
        ("Data", _data_report(data_report)),
        ("Test photos", _photos(predictions, test_dir)),
    ]
    body = "".join(f"<h2>{_e(name)}</h2>{content}" for name, content in sections)
    heading = title or f"Evaluation of {evaluation.get('model_id') or 'the model'}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(heading)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(heading)}</h1>"
            f"<p>{evaluation.get('test_images')} test photos.</p>{body}</body></html>")
