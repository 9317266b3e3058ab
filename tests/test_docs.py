"""Docs that cannot go stale: the README's parameter table is generated from the code."""
from __future__ import annotations

from pipeline.cli import docs
from pipeline.dag.parameters import PARAMETERS


def test_readme_parameter_table_matches_the_code():
    assert docs.main(["--check"]) == 0, "run: python -m pipeline.cli.docs"


def test_the_table_has_a_row_per_parameter_with_its_users():
    table = docs.parameter_table()
    rows = table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [f"`{p.name}`" for p in PARAMETERS]
    preprocess_row = next(r for r in rows if r.startswith("| `SelectCounts`"))
    assert "Preprocess" in preprocess_row
    assert "/work/" not in table and "/home/" not in table  # no machine paths


def test_a_stale_table_is_detected(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{docs.START}\n| old |\n{docs.END}\ny\n")
    monkeypatch.setattr(docs, "README", stale)
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
