"""pipeline/data/synth.py: deterministic synthetic bin photos in ABID bucket layout."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, import_script
from pipeline.data import synth


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every image and metadata file, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("bin-images", "metadata") for p in sorted((folder / sub).iterdir())}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synth.write_dataset(out, per_class=6, seed=3, workers=1)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(small_set, tmp_path):
    out, _ = small_set
    again = synth.write_dataset(tmp_path / "again", per_class=6, seed=3, workers=2)
    assert again["images"] == 30
    assert digest(tmp_path / "again") == digest(out)


def test_different_seed_gives_different_photos(small_set, tmp_path):
    out, _ = small_set
    synth.write_dataset(tmp_path / "other", per_class=6, seed=4, workers=1)
    a, b = digest(out), digest(tmp_path / "other")
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("bin-images/")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_layout_labels_and_metadata_format(small_set):
    out, summary = small_set
    images = sorted(p.stem for p in (out / "bin-images").glob("*.jpg"))
    metas = sorted(p.stem for p in (out / "metadata").glob("*.json"))
    assert images == metas and len(images) == 30
    counts = Counter()
    for image_id in images:
        meta = json.loads((out / "metadata" / f"{image_id}.json").read_text())
        n = meta["EXPECTED_QUANTITY"]
        assert isinstance(n, int) and 1 <= n <= 5
        assert meta["image_fname"] == f"{image_id}.jpg"
        skus = meta["BIN_FCSKU_DATA"]
        assert len(skus) == n  # one entry per item, as the brief asks
        assert sum(e["quantity"] for e in skus.values()) == n
        for asin, entry in skus.items():
            assert entry["asin"] == asin and entry["name"]
            for dim in ("height", "width", "length"):
                assert entry[dim]["unit"] == "IN" and entry[dim]["value"] > 0
        counts[n] += 1
    assert counts == {c: 6 for c in range(1, 6)}
    assert summary["counts"] == {str(c): 6 for c in range(1, 6)}
    assert summary["path"] == str(out) and summary["seconds"] > 0
    # The label order is shuffled: ids alone do not give the count away.
    labels = [json.loads((out / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"]
              for i in images]
    assert labels != sorted(labels)


def test_photos_are_rgb_jpegs_of_the_requested_size_with_content(small_set, tmp_path):
    out, _ = small_set
    for p in sorted((out / "bin-images").glob("*.jpg"))[:10]:
        with Image.open(p) as im:
            im.load()
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (160, 128))
            assert np.asarray(im).std() > 15  # a bin with items, not a flat fill
    synth.write_dataset(tmp_path / "big", per_class=1, seed=0, size=(200, 150), workers=1)
    with Image.open(next((tmp_path / "big" / "bin-images").glob("*.jpg"))) as im:
        assert im.size == (200, 150)


def test_more_items_cover_more_of_the_bin():
    """The count must be visible: photos with 5 items differ more from the bare bin colour
    than photos with 1 item (averaged over a few renders)."""
    def busy(count: int) -> float:
        scores = []
        for index in range(12):
            img, items = synth.render(count, seed=11, index=index, size=(160, 128))
            assert len(items) == count
            a = np.asarray(img, dtype=np.float32)[20:100, 25:135]  # the back wall
            scores.append(float(np.abs(a - np.median(a, axis=(0, 1))).mean()))
        return float(np.mean(scores))

    assert busy(5) > busy(1) * 1.3


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    real = tmp_path / "real"
    (real / "bin-images").mkdir(parents=True)
    (real / "bin-images" / "523.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        synth.write_dataset(real, per_class=1)
    assert (real / "bin-images" / "523.jpg").read_bytes() == b"precious"


def test_rewriting_a_synth_folder_leaves_no_stale_files(tmp_path):
    synth.write_dataset(tmp_path / "d", per_class=4, seed=0, workers=1)
    synth.write_dataset(tmp_path / "d", per_class=2, seed=0, workers=1)
    assert len(list((tmp_path / "d" / "bin-images").iterdir())) == 10
    assert len(list((tmp_path / "d" / "metadata").iterdir())) == 10


def test_command_line_and_preprocess_accept_the_output(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline.data.synth", str(tmp_path / "d"),
                          "--per-class", "4", "--seed", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "wrote 20 synthetic bin photos" in res.stdout
    # The same code path as real data: the preprocess script reads it without rejections.
    pp = import_script("preprocess", "preprocess")
    out = tmp_path / "out"
    assert pp.main(["--input", str(tmp_path / "d"), "--output", str(out), "--manifest", "",
                    "--workers", "1", "--resize", "112"]) == 0
    report = json.loads((out / "report" / "data_report.json").read_text())
    assert report["layout"] == "abid-bucket" and report["rejections"] == []
    assert report["counts_per_class"] == {str(c): 4 for c in range(1, 6)}


def test_command_line_errors_are_clear(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline.data.synth", str(tmp_path / "d"),
                          "--per-class", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "per_class must be at least 1" in res.stderr
    assert "Traceback" not in res.stderr
