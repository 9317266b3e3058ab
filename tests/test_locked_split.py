"""The locked part (pipeline/data/locked.py): deterministic, stratified, disjoint from what the
pipeline is given; and the score of a bulk CSV on it (benchmarks/locked_split.py)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from conftest import ROOT
from pipeline.data import locked, synth
from test_blend_cv import benchmark, real_blend_cv

SCRIPT = ROOT / "benchmarks" / "locked_split.py"


def by_count(n_per_count=(30, 55, 12, 41, 7)) -> dict[str, list[str]]:
    return {str(c): [f"{c}{i:05d}" for i in range(n)] for c, n in enumerate(n_per_count, start=1)}


def test_the_same_ids_give_the_same_locked_part_in_any_order():
    ids = by_count()
    shuffled = {c: random.Random(3).sample(v, len(v)) for c, v in reversed(list(ids.items()))}
    assert locked.locked_ids(ids) == locked.locked_ids(shuffled)
    assert locked.locked_ids(ids) != locked.locked_ids(ids, seed="another seed")


def test_each_count_keeps_its_share():
    ids = by_count()
    chosen = locked.locked_ids(ids)
    for count, members in ids.items():
        assert len(chosen & set(members)) == round(0.2 * len(members)), count


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        locked.locked_ids(by_count(), fraction=1.0)
    with pytest.raises(ValueError, match="appears twice"):
        locked.locked_ids({"1": ["a", "a"]})


def test_the_rest_and_the_locked_part_are_disjoint_and_hold_every_photo(tmp_path):
    data = tmp_path / "photos"
    synth.write_dataset(data, per_class=10, seed=4)
    folders = tmp_path / "folders"
    for image in sorted((data / "bin-images").glob("*.jpg")):  # one folder per count, as the sample
        count = json.loads((data / "metadata" / f"{image.stem}.json").read_text())["EXPECTED_QUANTITY"]
        (folders / str(count)).mkdir(parents=True, exist_ok=True)
        (folders / str(count) / image.name).write_bytes(image.read_bytes())
    sides = locked.write(folders, tmp_path / "out")
    rest = {p.stem for p in (tmp_path / "out" / "rest").rglob("*.jpg")}
    kept = {p.stem for p in (tmp_path / "out" / "locked").rglob("*.jpg")}
    everything = {p.stem for p in folders.rglob("*.jpg")}
    assert rest.isdisjoint(kept) and rest | kept == everything
    assert sides == {"rest": len(rest), "locked": len(kept)} and len(kept) == 10  # 2 of each count's 10
    assert (tmp_path / "out" / "locked.txt").read_text().split() == sorted(kept)
    for path in (tmp_path / "out" / "locked").rglob("*.jpg"):  # each photo keeps its count's folder
        assert (folders / path.parent.name / path.name).read_bytes() == path.read_bytes()


def test_a_photo_in_two_counts_is_refused(tmp_path):
    for count in ("1", "2"):
        (tmp_path / count).mkdir()
        (tmp_path / count / "00007.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="00007 is in both 1/ and 2/"):
        locked.read_folder(tmp_path)


def test_the_score_of_a_bulk_csv(tmp_path):
    score = benchmark("locked_split").score
    rows = [{"path": f"/x/{truth}/{i}.jpg", "count": str(answer)}
            for i, (truth, answer) in enumerate([(1, 1), (1, 2), (3, 3), (5, 5), (5, 3)])]
    rows.append({"path": "/x/2/9.jpg", "count": ""})  # an error: a wrong answer, scored as 3
    result = score(rows)
    assert result["photos"] == 6 and result["errors"] == 1
    assert result["accuracy"] == pytest.approx(3 / 6, abs=1e-4)
    assert result["rmse"] == pytest.approx(((1 + 4 + 1) / 6) ** 0.5, abs=1e-4)
    assert result["per_count"] == {"1": 0.5, "2": 0.0, "3": 1.0, "5": 0.5}
    low, high = result["accuracy_interval"]
    assert low <= 0.5 <= high and high - low > 0.2  # six photos: a wide interval


def test_two_recipes_compared_on_the_same_photos(tmp_path):
    compare = benchmark("locked_split").compare
    truth = [1, 2, 3, 4, 5, 5, 3, 2]
    rows = lambda given, order=1: [{"path": f"/x/{t}/{i}.jpg", "count": str(g)}  # noqa: E731
                                   for i, (t, g) in list(enumerate(zip(truth, given)))[::order]]
    a = rows([1, 2, 3, 3, 3, 3, 3, 3])  # 4 right
    b = rows([1, 2, 3, 4, 5, 4, 1, 2], order=-1)  # 6 right, listed in another order: paired by photo
    result = compare([(a, b), (a, a)])
    first, same = result["pairs"]
    assert result["photos"] == 8
    assert first["accuracy"] == pytest.approx(2 / 8) and (first["only_a_right"], first["only_b_right"]) == (1, 3)
    low, high = first["accuracy_interval"]
    assert low <= 2 / 8 <= high
    assert same == {"accuracy": 0.0, "accuracy_interval": [0.0, 0.0], "rmse": 0.0, "rmse_interval": [0.0, 0.0],
                    "only_a_right": 0, "only_b_right": 0}
    assert result["mean"]["accuracy"] == pytest.approx(1 / 8)
    # Different photos cannot be paired; the command says so in one line.
    (tmp_path / "a.csv").write_text("path,count\n/x/1/0.jpg,1\n")
    (tmp_path / "b.csv").write_text("path,count\n/x/1/1.jpg,1\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "locked_split: every CSV must answer the same photos\n"
    odd = subprocess.run([sys.executable, str(SCRIPT), "compare", str(tmp_path / "a.csv")], capture_output=True, text=True)
    assert odd.returncode == 2 and "compare takes pairs of CSVs" in odd.stderr


def test_a_serving_setting_tried_on_the_locked_part_without_training(tmp_path):
    """predict: the artifact's own code answers every photo, with flip TTA as asked, as a bulk CSV."""
    from conftest import make_artifact
    from serving_testing import bin_photo

    artifact = make_artifact(tmp_path / "model", image_size=32)
    for count in (1, 4):
        (tmp_path / "locked" / str(count)).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "locked" / str(count) / f"{count}{i}.jpg").write_bytes(bin_photo(count * 10 + i))
    scored = {}
    for tta in ("none", "flips"):
        out = tmp_path / f"{tta}.csv"
        done = subprocess.run([sys.executable, str(SCRIPT), "predict", str(artifact), "--photos", str(tmp_path / "locked"),
                               "--tta", tta, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        rows = out.read_text().splitlines()
        assert rows[0] == "path,count" and len(rows) == 7
        assert all(r.split(",")[1] in {"1", "2", "3", "4", "5"} for r in rows[1:])
        scored[tta] = json.loads(done.stdout)
    assert scored["none"]["photos"] == scored["flips"]["photos"] == 6
    empty = subprocess.run([sys.executable, str(SCRIPT), "predict", str(artifact), "--photos", str(tmp_path / "nothing"),
                            "--tta", "none", "--out", str(tmp_path / "x.csv")], capture_output=True, text=True)
    assert empty.returncode == 1 and "no <count>/*.jpg photos under" in empty.stderr


def test_a_models_offset_from_the_cross_validation_on_the_same_photos(tmp_path):
    """offset: a bulk CSV's expected counts against the mean of the out-of-fold sources', photo by
    photo whatever the order, per count and paired over all; an unknown photo is refused in one line."""
    import torch

    photos, labels = ["1/a.jpg", "1/b.jpg", "3/c.jpg", "5/d.jpg"], torch.tensor([0, 0, 2, 4])
    folds = torch.tensor([0, 1, 0, 1])
    one = lambda count: [1.0 if c == count else 0.0 for c in range(1, 6)]  # noqa: E731
    for seed, answers in (("s1", [1, 2, 3, 4]), ("s2", [1, 1, 3, 5])):  # expected counts 1, 1.5, 3, 4.5 averaged
        probabilities = torch.tensor([one(a) for a in answers])
        real_blend_cv.write_out_of_fold(tmp_path / f"{seed}.json", seed, {}, photos, labels, folds,
                                        {"none": probabilities, "flips": probabilities})
    header = "id,path,count,confidence,p1,p2,p3,p4,p5,error\n"
    (tmp_path / "model.csv").write_text(header + "".join(  # the model: 2, 2, 3, 5 (listed in another order)
        f"{p[2]},/served/{p},{c},1,{','.join(str(v) for v in one(c))},\n"
        for p, c in [("5/d.jpg", 5), ("3/c.jpg", 3), ("1/b.jpg", 2), ("1/a.jpg", 2)]))
    oof = [tmp_path / "s1.json", tmp_path / "s2.json"]
    result = benchmark("locked_split").offset(benchmark("locked_split").read(tmp_path / "model.csv"), oof)
    assert result["photos"] == 4 and result["errors"] == 0 and result["sources"] == 2
    assert result["difference"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert result["per_count"] == {"1": {"photos": 2, "model": 2.0, "cv": 1.25},
                                   "3": {"photos": 1, "model": 3.0, "cv": 3.0},
                                   "5": {"photos": 1, "model": 5.0, "cv": 4.5}}
    # A photo the model could not read (an error row, no p1..p5) is left out and counted.
    with_error = benchmark("locked_split").read(tmp_path / "model.csv") + [
        {"id": "e", "path": "/served/1/a.jpg", "count": "", "p1": "", "p2": "", "p3": "", "p4": "", "p5": "",
         "error": "not a decodable image"}]
    assert benchmark("locked_split").offset(with_error, oof)["errors"] == 1
    (tmp_path / "other.csv").write_text(header + f"x,/served/2/x.jpg,2,1,{','.join(str(v) for v in one(2))},\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "offset", str(tmp_path / "other.csv"), *map(str, oof)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "locked_split: 2/x.jpg has no out-of-fold answer in s1.json\n"
    (tmp_path / "counts.csv").write_text("path,count\n/served/1/a.jpg,1\n")  # what `predict` writes: no p1..p5
    done = subprocess.run([sys.executable, str(SCRIPT), "offset", str(tmp_path / "counts.csv"), *map(str, oof)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "has no p1..p5 columns" in done.stderr


@pytest.mark.real_data
def test_the_real_samples_locked_part(abid_sample, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "split", "--data", str(abid_sample), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"rest": 1384, "locked": 347}'
    per_count = {c: len(list((tmp_path / "out" / "locked" / c).iterdir())) for c in "12345"}
    assert per_count == {"1": 41, "2": 76, "3": 88, "4": 79, "5": 63}
