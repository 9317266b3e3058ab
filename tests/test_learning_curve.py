"""benchmarks/real_learning_curve.py: the learning curve docs/model.md quotes comes from these parts."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from test_blend_cv import benchmark, one_hot

real_blend_cv = benchmark("real_blend_cv")
benchmark("real_choose_cv")
curve = benchmark("real_learning_curve")


def test_the_line_through_the_points_gives_the_gain_per_doubling_and_where_it_reaches_the_goal():
    points = [(n, 0.2 + 0.02 * math.log2(n)) for n in (100, 200, 400, 800)]
    gain, photos = curve.photos_needed(points, 0.37)
    assert gain == pytest.approx(0.02) and photos == pytest.approx(2 ** 8.5)
    falling = [(n, 1.3 - 0.03 * math.log2(n)) for n in (100, 200, 400)]
    assert curve.photos_needed(falling, 1.10, higher_is_better=False)[1] == pytest.approx(2 ** (0.2 / 0.03))
    assert curve.photos_needed(falling, 1.10)[1] == math.inf  # for accuracy, more photos move it away
    assert curve.photos_needed([(n, 0.3) for n in (100, 200)], 0.37)[1] == math.inf  # flat


def oof(path, share: float | None, seed: int, right: float):
    """A seed's out-of-fold file whose tail counts `right` of the photos right, over both TTAs."""
    counts = [i % 5 for i in range(100)]
    answers = [c if (i * 37 % 100) < 100 * right else (c + 2) % 5 for i, c in enumerate(counts)]
    settings = {"seed": seed, **({"train_fraction": share} if share is not None else {})}
    p = one_hot(answers)
    real_blend_cv.write_out_of_fold(path, path.stem, settings, [f"/d/{c + 1}/{i}.jpg" for i, c in enumerate(counts)],
                                    torch.tensor(counts), torch.arange(100) % 5, {"flips": p, "flips+crops": p})
    return path


def test_each_share_is_scored_on_the_seeds_every_share_has(tmp_path, monkeypatch, capsys):
    files = [oof(tmp_path / "half-s2.json", 0.5, 2, 0.4), oof(tmp_path / "half-s3.json", 0.5, 3, 0.4),
             oof(tmp_path / "full-s2.json", None, 2, 0.6), oof(tmp_path / "full-s3.json", None, 3, 0.6),
             oof(tmp_path / "full-s4.json", None, 4, 0.1)]  # seed 4 has no half: left out
    monkeypatch.setattr(sys, "argv", ["real_learning_curve.py", *map(str, files), "--out", str(tmp_path / "c.json")])
    assert curve.main() == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["seeds"] == [2, 3]
    one_tail = [r for r in result["rows"] if r["tails"] == 1]
    assert [r["training_photos"] for r in one_tail] == [40, 80]  # a half, then all of the four fifths
    assert [r["accuracy"] for r in one_tail] == pytest.approx([0.4, 0.6])
    assert result["fits"]["one tail, flips, rounding"]["accuracy_per_doubling"] == pytest.approx(0.2)
    assert "2 tails, flips+crops, floor 0.25" in result["fits"]
    assert "per doubling" in capsys.readouterr().out


def test_one_share_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["real_learning_curve.py", str(oof(tmp_path / "a.json", None, 2, 0.5))])
    with pytest.raises(SystemExit) as exit:
        curve.main()
    assert exit.value.code == 2 and "two training shares" in capsys.readouterr().err
