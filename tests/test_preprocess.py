"""scripts/preprocess/preprocess.py on small real JPEGs and on a subset of the real ABID sample."""
from __future__ import annotations

import csv
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import FILE_LIST, SCRIPTS, import_script

pp = import_script("preprocess", "preprocess")
SCRIPT = SCRIPTS / "preprocess" / "preprocess.py"
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------
# Helpers: real image files, both input layouts, running the script


def jpeg_bytes(size=(64, 48), seed=0, mode="RGB", fmt="JPEG", exif=None) -> bytes:
    """A noisy image (noise, so that truncating the file loses real data)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    if exif is not None:
        kwargs["exif"] = exif
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_abid(root: Path, labels: dict[str, object], size=(64, 48)) -> Path:
    """ABID bucket layout; a label of None means: no metadata file."""
    (root / "bin-images").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i, (image_id, label) in enumerate(sorted(labels.items())):
        (root / "bin-images" / f"{image_id}.jpg").write_bytes(jpeg_bytes(size, seed=i))
        if label is not None:
            meta = {"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": label, "image_fname": f"{image_id}.jpg"}
            (root / "metadata" / f"{image_id}.json").write_text(json.dumps(meta))
    return root


def make_folders(root: Path, labels: dict[str, int], size=(64, 48)) -> Path:
    for i, (image_id, count) in enumerate(sorted(labels.items())):
        (root / str(count)).mkdir(parents=True, exist_ok=True)
        (root / str(count) / f"{image_id}.jpg").write_bytes(jpeg_bytes(size, seed=i))
    return root


def per_class(n: int, classes=(1, 2, 3, 4, 5), start: int = 0) -> dict[str, int]:
    """n ids per class, ids numbered like ABID's (zero-padded)."""
    labels, k = {}, start
    for c in classes:
        for _ in range(n):
            labels[f"{k:05d}"] = c
            k += 1
    return labels


def run(inp: Path, out: Path, *extra: str, manifest: str = "", workers: int = 1) -> tuple[int, dict]:
    rc = pp.main(["--input", str(inp), "--output", str(out), "--manifest", manifest,
                  "--workers", str(workers), *extra])
    report_path = out / "report" / "data_report.json"
    return rc, json.loads(report_path.read_text()) if report_path.exists() else {}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


def written(out: Path) -> dict[str, dict[str, int]]:
    """{split: {id: count}} from the image files on disk."""
    return {s: {p.stem: int(p.parent.name) for p in (out / s).glob("*/*.jpg")} for s in SPLITS}


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for s in SPLITS for p in sorted((out / s).rglob("*")) if p.is_file()}


def reasons(report: dict) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["kind"], r["reason"]) for r in report["rejections"]}


# ---------------------------------------------------------------------------------------------
# Layouts


def test_abid_bucket_layout_labels_come_from_metadata(tmp_path):
    labels = per_class(5)
    rc, report = run(make_abid(tmp_path / "in", labels), tmp_path / "out")
    assert rc == 0
    assert report["layout"] == "abid-bucket"
    on_disk = written(tmp_path / "out")
    assert {i: c for s in SPLITS for i, c in on_disk[s].items()} == labels
    assert report["totals"]["valid"] == report["totals"]["written"] == 25
    assert report["rejections"] == []


def test_count_folder_layout_labels_come_from_folders(tmp_path):
    labels = per_class(5)
    inp = make_folders(tmp_path / "in", labels)
    (inp / "SOURCES.md").write_text("top-level files are not images of the data set")
    rc, report = run(inp, tmp_path / "out")
    assert rc == 0
    assert report["layout"] == "count-folders"
    assert {i: c for s in SPLITS for i, c in written(tmp_path / "out")[s].items()} == labels
    assert report["counts_per_class"] == {str(c): 5 for c in range(1, 6)}


def test_count_folder_outside_one_to_five_is_rejected(tmp_path):
    labels = {**per_class(3), "00900": 0, "00901": 6}
    rc, report = run(make_folders(tmp_path / "in", labels), tmp_path / "out")
    assert rc == 0
    assert reasons(report) == {"00900": ("out_of_range", "count 0 outside 1-5"),
                               "00901": ("out_of_range", "count 6 outside 1-5")}


# ---------------------------------------------------------------------------------------------
# Bad files: each rejected with its reason, the rest processed


def test_every_kind_of_bad_file_is_rejected_with_its_reason(tmp_path):
    good = per_class(3)
    bad_labels = {"b_corrupt": 2, "b_header": 5, "b_trunc": 2, "b_empty": 3, "b_text": 3, "b_small": 4,
                  "b_nometa": None, "b_badjson": 1, "b_nokey": 1, "b_strlabel": 1,
                  "b_zero": 0, "b_seven": 7}
    inp = make_abid(tmp_path / "in", {**good, **bad_labels})
    images, meta = inp / "bin-images", inp / "metadata"
    full = jpeg_bytes((200, 150), seed=99)
    garbage = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (images / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + garbage)
    (images / "b_header.jpg").write_bytes(full[:400] + garbage + full[2400:])
    (images / "b_trunc.jpg").write_bytes(full[: len(full) * 6 // 10])
    (images / "b_empty.jpg").write_bytes(b"")
    (images / "b_text.jpg").write_text("this is not a photo\n")
    (images / "b_small.jpg").write_bytes(jpeg_bytes((20, 40)))
    (meta / "b_badjson.json").write_text("{not json")
    (meta / "b_nokey.json").write_text(json.dumps({"BIN_FCSKU_DATA": {}}))
    (meta / "b_strlabel.json").write_text(json.dumps({"EXPECTED_QUANTITY": "three"}))

    rc, report = run(inp, tmp_path / "out")

    assert rc == 0
    got = reasons(report)
    expected = {
        "b_corrupt": ("corrupt", "corrupt"), "b_header": ("corrupt", "corrupt JPEG"),
        "b_trunc": ("truncated", "truncated"),
        "b_empty": ("empty", "empty file"), "b_text": ("not_image", "not an image"),
        "b_small": ("too_small", "20x40"), "b_nometa": ("unlabelled", "missing metadata"),
        "b_badjson": ("unlabelled", "unparseable metadata"),
        "b_nokey": ("unlabelled", "no EXPECTED_QUANTITY"),
        "b_strlabel": ("unlabelled", "invalid EXPECTED_QUANTITY 'three'"),
        "b_zero": ("out_of_range", "count 0 outside 1-5"),
        "b_seven": ("out_of_range", "count 7 outside 1-5"),
    }
    assert set(got) == set(expected)
    for image_id, (kind, text) in expected.items():
        assert got[image_id][0] == kind, (image_id, got[image_id])
        assert text in got[image_id][1], (image_id, got[image_id])
    # Paths in the report point at the offending file.
    assert {r["path"] for r in report["rejections"]} == {f"bin-images/{i}.jpg" for i in expected}
    on_disk = {i for s in SPLITS for i in written(tmp_path / "out")[s]}
    assert on_disk == set(good)
    assert report["totals"]["rejected"] == len(expected)
    assert report["rejections_by_kind"]["unlabelled"] == 4


def test_duplicate_ids_keep_the_first_and_reject_the_rest(tmp_path):
    inp = make_folders(tmp_path / "in", per_class(3))
    shutil.copy(inp / "1" / "00000.jpg", inp / "2" / "00000.jpg")
    rc, report = run(inp, tmp_path / "out")
    assert rc == 0
    assert reasons(report) == {"00000": ("duplicate", "duplicate id: also at 1/00000.jpg")}


def test_grayscale_and_rgba_inputs_come_out_as_rgb_jpeg(tmp_path):
    inp = make_folders(tmp_path / "in", per_class(3))
    (inp / "1" / "gray.png").write_bytes(jpeg_bytes((50, 50), mode="L", fmt="PNG"))
    (inp / "2" / "alpha.png").write_bytes(jpeg_bytes((50, 50), mode="RGBA", fmt="PNG"))
    rc, report = run(inp, tmp_path / "out")
    assert rc == 0 and report["rejections"] == []
    for image_id in ("gray", "alpha"):
        (path,) = (tmp_path / "out").glob(f"*/*/{image_id}.jpg")
        with Image.open(path) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")


# ---------------------------------------------------------------------------------------------
# Manifest


def write_manifest(path: Path, labels: dict[str, int]) -> Path:
    data: dict[str, list[str]] = {}
    for image_id, count in sorted(labels.items()):
        data.setdefault(str(count), []).append(f"data/metadata/{image_id}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_manifest_restricts_images_and_reports_missing_ids(tmp_path):
    labels = per_class(6)
    inp = make_abid(tmp_path / "in", labels)
    listed = {i: c for i, c in labels.items() if int(i) % 2 == 0}
    missing = {"99990": 1, "99991": 3}
    manifest = write_manifest(tmp_path / "file_list.json", {**listed, **missing})

    rc, report = run(inp, tmp_path / "out", manifest=str(manifest))

    assert rc == 0
    assert {i for s in SPLITS for i in written(tmp_path / "out")[s]} == set(listed)
    summary = report["manifest_summary"]
    assert summary["ids"] == len(listed) + 2
    assert summary["missing_from_input"] == {"count": 2, "examples": ["99990", "99991"]}
    assert summary["input_not_in_manifest"]["count"] == len(labels) - len(listed)
    assert report["manifest"] == str(manifest)
    assert report["rejections"] == []  # ids outside the manifest are not selected, not rejected


def test_manifest_count_disagreeing_with_label_is_rejected(tmp_path):
    labels = per_class(3)
    inp = make_abid(tmp_path / "in", labels)
    manifest = write_manifest(tmp_path / "m.json", {**labels, "00000": 4})  # metadata says 1
    rc, report = run(inp, tmp_path / "out", manifest=str(manifest))
    assert rc == 0
    assert reasons(report) == {"00000": ("manifest_mismatch", "manifest says 4, metadata says 1")}
    folders = make_folders(tmp_path / "folders", labels)
    rc, report = run(folders, tmp_path / "out2", manifest=str(manifest))
    assert reasons(report) == {"00000": ("manifest_mismatch", "manifest says 4, folder says 1")}


def test_manifest_as_folder_missing_or_empty(tmp_path):
    labels = per_class(3)
    inp = make_folders(tmp_path / "in", labels)
    folder = tmp_path / "mounted"
    write_manifest(folder / "file_list.json", dict(list(labels.items())[:12]))
    rc, report = run(inp, tmp_path / "out1", manifest=str(folder))
    assert rc == 0 and report["totals"]["valid"] == 12
    assert report["manifest"] == str(folder / "file_list.json")

    for nothing in (str(tmp_path / "no-such-file.json"), str(tmp_path / "empty-dir"), ""):
        (tmp_path / "empty-dir").mkdir(exist_ok=True)
        rc, report = run(inp, tmp_path / "out2", manifest=nothing)
        assert rc == 0 and report["manifest"] is None and report["totals"]["valid"] == 15


def test_bad_manifest_is_a_clear_error(tmp_path, capsys):
    inp = make_folders(tmp_path / "in", per_class(3))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert pp.main(["--input", str(inp), "--output", str(tmp_path / "o"), "--manifest", str(bad)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.json").write_text("{}")
    (two / "b.json").write_text("{}")
    assert pp.main(["--input", str(inp), "--output", str(tmp_path / "o"), "--manifest", str(two)]) == 2
    assert "exactly one .json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Splits, determinism, resizing, balance


def test_split_is_stratified_60_20_20_per_class(tmp_path):
    sizes = {1: 50, 2: 20, 3: 7, 4: 11, 5: 33}
    labels, k = {}, 0
    for c, n in sizes.items():
        for _ in range(n):
            labels[f"{k:05d}"] = c
            k += 1
    rc, report = run(make_folders(tmp_path / "in", labels, size=(40, 40)), tmp_path / "out")
    assert rc == 0
    on_disk = written(tmp_path / "out")
    for c, n in sizes.items():
        got = [sum(1 for v in on_disk[s].values() if v == c) for s in SPLITS]
        assert sum(got) == n
        for have, frac in zip(got, (0.6, 0.2, 0.2)):
            assert abs(have - n * frac) <= 1, (c, got)
        assert [report["counts"][s][str(c)] for s in SPLITS] == got
    # Over all classes too, each split is within one image of its share.
    for s, frac in zip(SPLITS, (0.6, 0.2, 0.2)):
        assert abs(report["counts"][s]["total"] - len(labels) * frac) <= 1
    # manifest.csv lists exactly the files of its split, with their real sizes
    for s in SPLITS:
        with open(tmp_path / "out" / s / "manifest.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["id"]: int(r["count"]) for r in rows} == on_disk[s]
        for r in rows[:5]:
            with Image.open(tmp_path / "out" / s / r["count"] / f"{r['id']}.jpg") as im:
                assert im.size == (int(r["width"]), int(r["height"]))


def test_tiny_classes_still_fill_every_split(tmp_path):
    # 3 images per class: 60/20/20 of 3 is 1.8/0.6/0.6; leftovers must not all go one way.
    rc, report = run(make_folders(tmp_path / "in", per_class(3)), tmp_path / "out")
    assert rc == 0
    assert [report["counts"][s]["total"] for s in SPLITS] == [10, 3, 2]
    for c in range(1, 6):  # every image of every class lands in exactly one split, train first
        assert sum(report["counts"][s][str(c)] for s in SPLITS) == 3
        assert report["counts"]["train"][str(c)] >= 1


def test_split_ignores_listing_order_and_other_classes():
    ids = {c: [f"{c}{i:04d}" for i in range(40)] for c in range(1, 6)}
    base = pp.split_ids(ids, (0.6, 0.2, 0.2), seed=7)
    shuffled = {c: random.Random(c).sample(v, len(v)) for c, v in ids.items()}
    assert pp.split_ids(shuffled, (0.6, 0.2, 0.2), seed=7) == base
    # A class's members do not move when another class changes.
    fewer = {**ids, 5: ids[5][:10]}
    assert all(pp.split_ids(fewer, (0.6, 0.2, 0.2), seed=7)[s][1] == base[s][1] for s in SPLITS)
    assert pp.split_ids(ids, (0.6, 0.2, 0.2), seed=8) != base
    for c in ids:
        parts = [set(base[s][c]) for s in SPLITS]
        assert set().union(*parts) == set(ids[c]) and sum(map(len, parts)) == 40


def test_reruns_and_worker_counts_give_identical_output(tmp_path):
    inp = make_abid(tmp_path / "in", per_class(8), size=(90, 70))
    rc1, r1 = run(inp, tmp_path / "a", "--resize", "48", workers=1)
    rc2, r2 = run(inp, tmp_path / "a", "--resize", "48", workers=1)  # rerun into the same folder
    first = tree_bytes(tmp_path / "a")
    rc3, r3 = run(inp, tmp_path / "b", "--resize", "48", workers=2)
    assert rc1 == rc2 == rc3 == 0
    assert first and tree_bytes(tmp_path / "b") == first
    strip = lambda r: {k: v for k, v in r.items() if k not in ("elapsed_seconds", "workers")}
    assert strip(r1) == strip(r2) == strip(r3)
    # Another seed gives another split.
    run(inp, tmp_path / "c", "--resize", "48", "--seed", "1")
    assert written(tmp_path / "c") != written(tmp_path / "a")


def test_rerun_removes_stale_images(tmp_path):
    inp = make_folders(tmp_path / "in", per_class(5))
    stale = tmp_path / "out" / "train" / "3" / "stale.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(jpeg_bytes())
    assert run(inp, tmp_path / "out")[0] == 0
    assert not stale.exists()


def test_resize_sets_short_side_keeps_aspect_and_never_upscales(tmp_path):
    inp = tmp_path / "in"
    (inp / "1").mkdir(parents=True)
    (inp / "1" / "land.jpg").write_bytes(jpeg_bytes((300, 200)))
    (inp / "1" / "port.jpg").write_bytes(jpeg_bytes((120, 250)))
    (inp / "1" / "tiny.jpg").write_bytes(jpeg_bytes((70, 60)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotated 90 degrees)
    (inp / "1" / "turned.jpg").write_bytes(jpeg_bytes((240, 160), exif=exif))
    rc, report = run(inp, tmp_path / "out", "--resize", "80", "--split", "1,0,0")
    assert rc == 1  # validation and test are empty on purpose, but the images are written
    sizes = {}
    for p in (tmp_path / "out" / "train" / "1").glob("*.jpg"):
        with Image.open(p) as im:
            sizes[p.stem] = im.size
    assert sizes == {"land": (120, 80), "port": (80, 167), "tiny": (70, 60), "turned": (80, 120)}
    assert report["totals"]["kept_below_resize"] == 1


def test_the_test_split_keeps_each_jpeg_as_received(tmp_path):
    """Evaluate scores (and its monitoring baseline describes) the photos the endpoint will be
    sent: the test split's JPEGs are the bytes received, not copies resized for training. A photo
    whose bytes are not a JPEG keeps its JPEG copy (its .jpg name must not lie to Evaluate)."""
    inp = tmp_path / "in"
    (inp / "2").mkdir(parents=True)
    (inp / "2" / "land.jpg").write_bytes(jpeg_bytes((300, 200), seed=1))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    (inp / "2" / "turned.jpg").write_bytes(jpeg_bytes((240, 160), seed=2, exif=exif))
    (inp / "2" / "png.jpg").write_bytes(jpeg_bytes((300, 200), seed=3, fmt="PNG"))
    rc, _ = run(inp, tmp_path / "out", "--resize", "80", "--split", "0,0,1")
    assert rc == 1  # train and validation are empty on purpose
    test = tmp_path / "out" / "test" / "2"
    assert (test / "land.jpg").read_bytes() == (inp / "2" / "land.jpg").read_bytes()
    assert (test / "turned.jpg").read_bytes() == (inp / "2" / "turned.jpg").read_bytes()
    with Image.open(test / "png.jpg") as im:
        assert im.format == "JPEG" and im.size == (120, 80)
    with open(tmp_path / "out" / "test" / "manifest.csv") as f:
        sizes = {r["id"]: (int(r["width"]), int(r["height"])) for r in csv.DictReader(f)}
    assert sizes == {"land": (300, 200), "turned": (160, 240), "png": (120, 80)}  # upright
    assert not list((tmp_path / "out").glob("**/*.staging*"))


def test_balance_downsamples_every_class_to_the_smallest(tmp_path):
    sizes = {1: 12, 2: 6, 3: 9, 4: 15, 5: 10}
    labels, k = {}, 0
    for c, n in sizes.items():
        for _ in range(n):
            labels[f"{k:05d}"] = c
            k += 1
    inp = make_folders(tmp_path / "in", labels, size=(40, 40))
    rc, report = run(inp, tmp_path / "out", "--balance")
    assert rc == 0
    assert report["counts_per_class"] == {str(c): 6 for c in sizes}
    assert report["totals"]["dropped_by_balance"] == sum(sizes.values()) - 30
    for s, n in zip(SPLITS, (4, 1, 1)):  # 6 -> cuts at round(3.6) and round(4.8)
        assert all(report["counts"][s][str(c)] == n for c in sizes)
    assert not (tmp_path / "out" / ".staging").exists()
    rc, again = run(inp, tmp_path / "out2", "--balance")
    assert written(tmp_path / "out2") == written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Errors through the command line: clear message, exit code, no traceback


def test_unknown_layout_is_a_clear_error_without_traceback(tmp_path):
    inp = tmp_path / "in"
    (inp / "photos").mkdir(parents=True)
    (inp / "photos" / "a.jpg").write_bytes(jpeg_bytes())
    res = run_cli("--input", str(inp), "--output", str(tmp_path / "out"), "--manifest", "")
    assert res.returncode == 2
    assert "unknown input layout" in res.stderr and "photos/" in res.stderr
    assert "bin-images" in res.stderr  # says what it expected
    assert "Traceback" not in res.stderr

    res = run_cli("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_nothing_usable_exits_non_zero_and_still_reports(tmp_path):
    inp = tmp_path / "in"
    (inp / "2").mkdir(parents=True)
    for i in range(4):
        (inp / "2" / f"{i}.jpg").write_bytes(b"")
    res = run_cli("--input", str(inp), "--output", str(tmp_path / "out"), "--manifest", "")
    assert res.returncode == 1
    assert "no usable images" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((tmp_path / "out" / "report" / "data_report.json").read_text())
    assert report["rejections_by_kind"] == {"empty": 4}


def test_bad_arguments_are_usage_errors(tmp_path):
    for args in (["--split", "0.6,0.4"], ["--resize", "0"], ["--workers", "x"]):
        res = run_cli("--input", str(tmp_path), *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, args


# ---------------------------------------------------------------------------------------------
# Real photos


def test_real_abid_sample_subset_through_the_script(abid_sample, tmp_path):
    inp = tmp_path / "abid"
    for c in range(1, 6):
        (inp / str(c)).mkdir(parents=True)
        for photo in sorted((abid_sample / str(c)).glob("*.jpg"))[:20]:
            shutil.copy(photo, inp / str(c) / photo.name)
    out = tmp_path / "out"
    res = run_cli("--input", str(inp), "--manifest", str(FILE_LIST), "--output", str(out),
                  "--resize", "128", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "took" in res.stdout and "train" in res.stdout
    report = json.loads((out / "report" / "data_report.json").read_text())
    assert report["layout"] == "count-folders"
    assert report["rejections"] == []
    for s, n in zip(SPLITS, (12, 4, 4)):
        assert report["counts"][s] == {**{str(c): n for c in range(1, 6)}, "total": 5 * n}
    assert report["manifest_summary"]["missing_from_input"]["count"] == 10441 - 100
    for p in sorted(out.glob("test/*/*.jpg")):  # the test split: the photos as received
        assert p.read_bytes() == (inp / p.parent.name / p.name).read_bytes()
    for p in sorted(out.glob("*/*/*.jpg"))[::7]:
        if p.parent.parent.name == "test":
            continue
        with Image.open(inp / p.parent.name / p.name) as original:
            w, h = original.size
        with Image.open(p) as im:
            im.load()
            assert im.mode == "RGB"
            assert min(im.size) == min(128, w, h)  # short side set, never upscaled
            assert abs(im.size[0] / im.size[1] - w / h) < 0.02  # aspect kept
