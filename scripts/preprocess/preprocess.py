"""Preprocess step: validate, resize and split ABID bin photos, and write a data report.

A plain command-line program (the SageMaker processing container runs it as is); it never
imports pipeline/ or steps/. Only the standard library, pillow and numpy.

Input layouts, detected from the --input folder:
  abid-bucket    bin-images/<id>.jpg + metadata/<id>.json (label = EXPECTED_QUANTITY)
  count-folders  1/<id>.jpg ... 5/<id>.jpg (label = folder name)

Output (--output):
  <split>/<count>/<id>.jpg   RGB JPEG q90, short side resized to --resize (never upscaled)
  <split>/manifest.csv       id,count,width,height
  report/data_report.json    layout, manifest, totals, counts per split and class, rejections

Images are never upscaled: it invents no detail and the training/serving transforms resize to
the network's input anyway; photos below --resize keep their size and are counted in the report.

The split depends only on the sorted ids of the accepted images per count and on --seed, so it is
the same across reruns, file-system listing orders and worker counts.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLASSES = (1, 2, 3, 4, 5)
SPLITS = ("train", "validation", "test")
JPEG_QUALITY = 90
EXAMPLES = 10  # how many ids the report lists for long lists (missing ids, ...)
LAYOUT_ABID = "abid-bucket"
LAYOUT_FOLDERS = "count-folders"
ORIENTATION_TAG = 0x0112
MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"))


class InputError(Exception):
    """Bad input as a whole (no such folder, unknown layout, unreadable manifest): exit 2."""


@dataclass(frozen=True)
class Candidate:
    """One image file found in the input, with its label (or why it has none)."""

    id: str
    path: Path
    rel: str  # path relative to --input, for the report
    label: int | None
    label_error: str | None = None
    label_source: str = "metadata"  # where the label came from, for mismatch messages


@dataclass(frozen=True)
class Task:
    """What a worker needs to validate, resize and stage one image."""

    id: str
    path: str
    staged: str
    resize: int
    min_size: int


@dataclass(frozen=True)
class Result:
    """A worker's answer: the written size, or the kind and reason of a rejection."""

    id: str
    kind: str | None
    reason: str | None
    width: int = 0
    height: int = 0


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.6,0.2,0.2, got {text!r}")
    if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative numbers like 0.6,0.2,0.2, got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess",
        description="Validate, resize and split ABID bin photos into train/validation/test.")
    p.add_argument("--input", default="/opt/ml/processing/input/data",
                   help="ABID bucket layout (bin-images/, metadata/) or one folder per count")
    p.add_argument("--manifest", default="/opt/ml/processing/input/manifest",
                   help="file_list.json-style manifest, or a folder holding one .json file; "
                        "a missing or empty path means no manifest")
    p.add_argument("--output", default="/opt/ml/processing/output")
    p.add_argument("--resize", type=positive_int, default=256,
                   help="short side in pixels (images are never upscaled)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", type=parse_split, default=(0.6, 0.2, 0.2),
                   help="train,validation,test fractions (default 0.6,0.2,0.2)")
    p.add_argument("--balance", action="store_true",
                   help="downsample every count to the smallest count's size (seeded)")
    p.add_argument("--min-size", type=positive_int, default=32,
                   help="reject images whose short side is below this")
    p.add_argument("--workers", type=positive_int, default=default_workers(),
                   help="processes decoding and resizing (default min(4, cpus))")
    return p


# ---------------------------------------------------------------------------------------------
# Manifest


def resolve_manifest(arg: str | None) -> Path | None:
    """The manifest file, or None when the argument names nothing (no manifest)."""
    if not arg:
        return None
    path = Path(arg)
    if not path.exists():
        return None
    if path.is_file():
        return path
    found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not found:
        return None  # an empty mounted folder: the pipeline ran without a manifest
    jsons = [p for p in found if p.suffix.lower() == ".json"]
    if len(jsons) != 1:
        raise InputError(f"manifest folder {path} must hold exactly one .json file, "
                         f"found: {', '.join(p.name for p in found)}")
    return jsons[0]


def load_manifest(path: Path) -> dict[str, int]:
    """file_list.json ({"1": ["data/metadata/100313.json", ...], ...}) -> {image id: count}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"manifest {path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"manifest {path} must be a JSON object of count -> list of files")
    ids: dict[str, int] = {}
    for key, entries in data.items():
        try:
            count = int(key)
        except ValueError:
            raise InputError(f"manifest {path}: key {key!r} is not a count") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(f"manifest {path}: the value of {key!r} must be a list of paths")
        for entry in entries:
            image_id = Path(entry.replace("\\", "/")).stem
            if ids.get(image_id, count) != count:
                raise InputError(f"manifest {path}: id {image_id} is listed under both "
                                 f"{ids[image_id]} and {count}")
            ids[image_id] = count
    return ids


# ---------------------------------------------------------------------------------------------
# Input discovery


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def count_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))


def detect_layout(root: Path) -> str:
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist")
    if (root / "bin-images").is_dir():
        return LAYOUT_ABID
    if count_folders(root):
        return LAYOUT_FOLDERS
    seen = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:10]
    raise InputError(
        f"unknown input layout in {root}: expected bin-images/ + metadata/ (ABID bucket layout) "
        f"or one folder per count (1/ ... 5/); found: {', '.join(seen) or 'nothing'}")


def read_label(meta: Path) -> tuple[int | None, str | None]:
    """EXPECTED_QUANTITY from an ABID metadata file, or (None, why it is unusable)."""
    if not meta.is_file():
        return None, "unlabelled: missing metadata"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unlabelled: unparseable metadata ({type(e).__name__})"
    if not isinstance(data, dict) or "EXPECTED_QUANTITY" not in data:
        return None, "unlabelled: metadata has no EXPECTED_QUANTITY"
    value = data["EXPECTED_QUANTITY"]
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"unlabelled: invalid EXPECTED_QUANTITY {value!r}"
    return value, None


def find_candidates(root: Path, layout: str) -> list[Candidate]:
    """Every image file with its label, in path order."""
    found = []
    if layout == LAYOUT_ABID:
        for path in visible_files(root / "bin-images"):
            label, error = read_label(root / "metadata" / f"{path.stem}.json")
            found.append(Candidate(path.stem, path, path.relative_to(root).as_posix(), label, error))
    else:
        for folder in count_folders(root):
            for path in visible_files(folder):
                found.append(Candidate(path.stem, path, path.relative_to(root).as_posix(),
                                       int(folder.name), label_source="folder"))
    return found


# ---------------------------------------------------------------------------------------------
# Image work (runs in the worker processes)


def target_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the short side == `short`, aspect kept; unchanged if already smaller."""
    current = min(width, height)
    if current <= short:
        return width, height
    scale = short / current
    if width <= height:
        return short, max(1, round(height * scale))
    return max(1, round(width * scale)), short


def sniff_format(path: str) -> str | None:
    """The image format a file's first bytes claim, if any."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


def final_size(im: Image.Image, short: int) -> tuple[int, int]:
    """Output size from the stored size, turned as the EXIF orientation turns the photo."""
    width, height = im.size
    if im.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    return target_size(width, height, short)


def process_image(task: Task) -> Result:
    """Decode fully, check, resize and stage one image.

    Never raises for bad image bytes: every failure becomes a (kind, reason) rejection.
    """
    try:
        if os.path.getsize(task.path) == 0:
            return Result(task.id, "empty", "empty file")
        with Image.open(task.path) as im:
            width, height = im.size
            if min(width, height) < task.min_size:
                return Result(task.id, "too_small",
                              f"too small: {width}x{height}, short side < {task.min_size} px")
            size = final_size(im, task.resize)
            # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: every byte is still decoded
            # (truncation is still caught), for far less work; it never goes below `size`.
            im.draft("RGB", target_size(width, height, task.resize))
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError:
        fmt = sniff_format(task.path)
        if fmt:  # PIL reports a damaged header as "unidentified": say what it really is
            return Result(task.id, "corrupt", f"corrupt {fmt}: its header cannot be decoded")
        return Result(task.id, "not_image", "not an image: no decoder recognises the bytes")
    except Image.DecompressionBombError as e:
        return Result(task.id, "too_large", f"too large: {e}")
    except (OSError, SyntaxError, ValueError) as e:
        return Result(task.id, "corrupt", f"corrupt or truncated image: {e}")
    except Exception as e:  # a decoder bug must not stop the job; report it instead
        return Result(task.id, "corrupt", f"unreadable image: {type(e).__name__}: {e}")
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    rgb.save(task.staged, "JPEG", quality=JPEG_QUALITY)
    return Result(task.id, None, None, *size)


def run_tasks(tasks: list[Task], workers: int) -> list[Result]:
    if workers <= 1 or len(tasks) < 2:
        return [process_image(t) for t in tasks]
    chunk = max(1, min(32, len(tasks) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(process_image, tasks, chunksize=chunk))


# ---------------------------------------------------------------------------------------------
# Selection, balancing and splitting (pure functions of sorted ids and the seed)


def class_rng(seed: int, purpose: int, count: int) -> np.random.Generator:
    """One generator per (purpose, class): a class's draw never depends on the others."""
    return np.random.default_rng([seed, purpose, count])


def balance(ids_by_count: dict[int, list[str]], seed: int) -> dict[int, list[str]]:
    """Downsample every class to the size of the smallest non-empty one."""
    sizes = [len(v) for v in ids_by_count.values() if v]
    if not sizes:
        return ids_by_count
    keep = min(sizes)
    out = {}
    for count, ids in ids_by_count.items():
        ids = sorted(ids)
        chosen = class_rng(seed, 1, count).choice(len(ids), size=keep, replace=False) if ids else []
        out[count] = sorted(ids[i] for i in chosen)
    return out


def split_sizes(n: int, fractions, deficits) -> list[int]:
    """How many of a class's n images go to each split: the floor of each exact share, then
    the leftover images to the largest remainders; ties go to the split furthest below its
    overall target, so that many tiny classes do not all leave the same split empty."""
    exact = [round(n * f, 9) for f in fractions]  # 9 digits: 5 * 0.6 must be 3, not 2.99..
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - sizes[i]), -deficits[i], i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_ids(ids_by_count: dict[int, list[str]], fractions: tuple[float, float, float],
              seed: int) -> dict[str, dict[int, list[str]]]:
    """Stratified split: each class is shuffled by its own generator and cut into shares."""
    result: dict[str, dict[int, list[str]]] = {s: {} for s in SPLITS}
    assigned = [0] * len(SPLITS)
    seen = 0
    for count in sorted(ids_by_count):
        ids = sorted(ids_by_count[count])
        seen += len(ids)
        deficits = [f * seen - a for f, a in zip(fractions, assigned)]
        sizes = split_sizes(len(ids), fractions, deficits)
        order = class_rng(seed, 0, count).permutation(len(ids))
        shuffled = [ids[i] for i in order]
        start = 0
        for k, (split, size) in enumerate(zip(SPLITS, sizes)):
            result[split][count] = sorted(shuffled[start:start + size])
            assigned[k] += size
            start += size
    return result


# ---------------------------------------------------------------------------------------------
# The job


def examples(items) -> list:
    return sorted(items)[:EXAMPLES]


def select(candidates: list[Candidate], manifest: dict[str, int] | None):
    """Apply duplicates, manifest and label rules: (accepted candidates, rejections, info)."""
    rejections: list[dict] = []
    accepted: list[Candidate] = []
    first_seen: dict[str, Candidate] = {}
    not_in_manifest: list[str] = []

    def reject(c: Candidate, kind: str, reason: str) -> None:
        rejections.append({"id": c.id, "path": c.rel, "kind": kind, "reason": reason})

    for c in candidates:
        if c.id in first_seen:
            reject(c, "duplicate", f"duplicate id: also at {first_seen[c.id].rel}")
            continue
        first_seen[c.id] = c
        if manifest is not None and c.id not in manifest:
            not_in_manifest.append(c.id)
            continue
        if c.label is None:
            reject(c, "unlabelled", c.label_error or "unlabelled")
        elif c.label not in CLASSES:
            reject(c, "out_of_range", f"count {c.label} outside 1-5")
        elif manifest is not None and manifest[c.id] != c.label:
            reject(c, "manifest_mismatch",
                   f"manifest says {manifest[c.id]}, {c.label_source} says {c.label}")
        else:
            accepted.append(c)
    info: dict = {}
    if manifest is not None:
        missing = set(manifest) - set(first_seen)
        info = {
            "ids": len(manifest),
            "missing_from_input": {"count": len(missing), "examples": examples(missing)},
            "input_not_in_manifest": {"count": len(not_in_manifest),
                                      "examples": examples(not_in_manifest)},
        }
    return accepted, rejections, info


def prepare_output(out: Path) -> Path:
    """Empty the folders this job owns (a rerun must not keep stale images) and a staging area."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*SPLITS, "report", ".staging"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    staging = out / ".staging"
    staging.mkdir()
    return staging


def write_split(out: Path, split: str, ids_by_count: dict[int, list[str]], staging: Path,
                sizes: dict[str, tuple[int, int]]) -> None:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in sorted(ids_by_count):
        (folder / str(count)).mkdir(exist_ok=True)
        for image_id in ids_by_count[count]:
            # move, not os.replace: the split folders may be separate mounts in a container
            shutil.move(staging / f"{image_id}.jpg", folder / str(count) / f"{image_id}.jpg")
            rows.append((image_id, count, *sizes[image_id]))
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "count", "width", "height"))
        writer.writerows(rows)


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the data report (also written to report/data_report.json)."""
    start = time.perf_counter()
    root = Path(args.input)
    layout = detect_layout(root)
    manifest_path = resolve_manifest(args.manifest)
    manifest = load_manifest(manifest_path) if manifest_path else None

    candidates = find_candidates(root, layout)
    accepted, rejections, manifest_info = select(candidates, manifest)
    selected = len(accepted) + sum(r["kind"] != "duplicate" for r in rejections)

    out = Path(args.output)
    try:
        staging = prepare_output(out)
    except OSError as e:
        raise InputError(f"cannot write to output folder {out}: {e}") from None
    tasks = [Task(c.id, str(c.path), str(staging / f"{c.id}.jpg"), args.resize, args.min_size)
             for c in accepted]
    by_id = {c.id: c for c in accepted}
    sizes: dict[str, tuple[int, int]] = {}
    for r in run_tasks(tasks, args.workers):
        if r.kind is None:
            sizes[r.id] = (r.width, r.height)
        else:
            rejections.append({"id": r.id, "path": by_id[r.id].rel, "kind": r.kind,
                               "reason": r.reason})

    valid: dict[int, list[str]] = {k: [] for k in CLASSES}
    for image_id in sorted(sizes):
        valid[by_id[image_id].label].append(image_id)
    kept = balance(valid, args.seed) if args.balance else valid
    splits = split_ids(kept, args.split, args.seed)
    for split in SPLITS:
        write_split(out, split, splits[split], staging, sizes)
    shutil.rmtree(staging)  # what is left there was dropped by --balance

    rejections.sort(key=lambda r: (r["path"], r["reason"]))
    written = {s: {str(k): len(v) for k, v in splits[s].items()} for s in SPLITS}
    report = {
        "input": str(root),
        "layout": layout,
        "manifest": str(manifest_path) if manifest_path else None,
        "manifest_argument": args.manifest,
        "manifest_summary": manifest_info or None,
        "resize_short_side": args.resize,
        "upscale": False,
        "min_size": args.min_size,
        "seed": args.seed,
        "split_fractions": dict(zip(SPLITS, args.split)),
        "balance": args.balance,
        "workers": args.workers,
        "totals": {
            "found": len(candidates),
            "selected": selected,
            "valid": len(sizes),
            "rejected": len(rejections),
            "dropped_by_balance": len(sizes) - sum(len(v) for v in kept.values()),
            "kept_below_resize": sum(min(wh) < args.resize for wh in sizes.values()),
            "written": sum(sum(v.values()) for v in written.values()),
        },
        "counts": {s: {**written[s], "total": sum(written[s].values())} for s in SPLITS},
        "counts_per_class": {str(k): sum(written[s][str(k)] for s in SPLITS) for k in CLASSES},
        "rejections_by_kind": count_kinds(rejections),
        "rejections": rejections,
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def count_kinds(rejections: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in rejections:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return dict(sorted(kinds.items()))


def summary(report: dict) -> str:
    t = report["totals"]
    lines = [f"preprocess: {report['layout']} layout at {report['input']}"
             + (f", manifest {report['manifest']}" if report["manifest"] else
                f", no manifest (nothing at {report['manifest_argument']})"
                if report["manifest_argument"] else ", no manifest")]
    m = report["manifest_summary"]
    if m:
        lines.append(f"  manifest: {m['ids']} ids, {m['missing_from_input']['count']} missing "
                     f"from input, {m['input_not_in_manifest']['count']} input images not listed")
    lines.append(f"  found {t['found']}, valid {t['valid']}, rejected {t['rejected']}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in report['rejections_by_kind'].items())})"
                    if t["rejected"] else "")
                 + (f", dropped by balance {t['dropped_by_balance']}" if report["balance"] else ""))
    header = "  " + " " * 10 + "".join(f"{k:>6}" for k in CLASSES) + f"{'total':>8}"
    lines.append(header)
    for split in SPLITS:
        c = report["counts"][split]
        lines.append(f"  {split:<10}" + "".join(f"{c[str(k)]:>6}" for k in CLASSES)
                     + f"{c['total']:>8}")
    lines.append(f"  resized short side to {report['resize_short_side']} px (never upscaled; "
                 f"{t['kept_below_resize']} kept smaller), seed {report['seed']}")
    lines.append(f"  took {report['elapsed_seconds']:.1f} s with {report['workers']} worker(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except InputError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    empty = [s for s in SPLITS if report["counts"][s]["total"] == 0]
    if empty:
        print(f"preprocess: error: no usable images for split(s) {', '.join(empty)} "
              f"({report['totals']['valid']} valid of {report['totals']['found']} found; "
              f"see {Path(args.output) / 'report' / 'data_report.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
