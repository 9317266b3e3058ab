"""The README's parameter table, generated from pipeline/dag/parameters.py, profiles.py and steps/.

    python -m pipeline.cli.docs          # rewrite the table in README.md
    python -m pipeline.cli.docs --check  # exit 1 when README.md is out of date (tests/test_docs.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipeline.dag.parameters import PARAMETERS
from pipeline.dag.profiles import PROFILES
from steps import DAG
from steps.base import Param

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- parameters:start (python -m pipeline.cli.docs) -->", "<!-- parameters:end -->"


def params_in(value, found: set[str]) -> set[str]:
    """Every Param referenced anywhere inside a declaration (dataclasses, tuples)."""
    if isinstance(value, Param):
        found.add(value.name)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            params_in(getattr(value, f.name), found)
    elif isinstance(value, (tuple, list)):
        for item in value:
            params_in(item, found)
    return found


def used_by() -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for step in DAG.steps:
        for name in sorted(params_in(step, set())):
            users.setdefault(name, []).append(step.name)
    return users


def shown(value) -> str:
    text = str(value)
    if text == "":
        return "(empty)"
    if "/" in text and not text.startswith("s3://"):  # a shipped file: its name, not this machine's path
        return f"`{Path(text).name}` (shipped)"
    return f"`{text}`"


def parameter_table() -> str:
    others = [p for p in PROFILES if p != "full"]
    users = used_by()
    head = ["Parameter", "Type", "Allowed", "Default (`full`)", *[f"`{p}` profile" for p in others], "Used by", "What it does"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in PARAMETERS:
        full = PROFILES["full"][p.name]
        cells = [f"`{p.name}`", p.type.__name__, p.describe().replace("|", "\\|"), shown(full)]
        cells += ["same" if PROFILES[o][p.name] == full else shown(PROFILES[o][p.name]) for o in others]
        cells += [", ".join(users.get(p.name, [])) or "job settings", p.help.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{parameter_table()}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true")
    check = args.parse_args(argv).check
    text = README.read_text()
    new = render(text)
    if check:
        if new != text:
            print("README.md's parameter table is out of date: run python -m pipeline.cli.docs", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
