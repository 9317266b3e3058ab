"""Preprocess step: validate, resize and split ABID bin photos, and write a data report.

A plain command-line program (the SageMaker processing container runs it as is); it never
imports pipeline/ or steps/. The standard library, pillow, numpy, and boto3 + tqdm for S3.

Input (--input): a local folder, or an S3 URI that the step reads itself.
  abid-bucket    bin-images/<id>.jpg + metadata/<id>.json (label = EXPECTED_QUANTITY)
  count-folders  1/<id>.jpg ... 5/<id>.jpg (label = folder name; local folders only)
With an S3 URI only the objects the manifest (or the selection rule) names are read, through
s3fetch.py, the code `invmon data fetch` uses. With several processing instances each takes a
disjoint shard (--shard auto reads SageMaker's resourceconfig.json); the split is planned over
the whole selection on every instance, so the shards' outputs add up to one split.

Output (--output):
  <split>/<count>/<id>.jpg   RGB JPEG q90, short side resized to --resize (never upscaled); the
                             test split keeps each JPEG as received, byte for byte, so Evaluate
                             scores the photos the endpoint will be sent
  <split>/manifest.csv       the index: id,count,width,height,md5 (manifest-<host>.csv per shard)
  report/data_report.json    layout, selection, totals, counts per split and class, rejections,
                             duplicate groups (data_report-<host>.json per shard)
  report/image_statistics.json   with --statistics-side: every written photo's brightness,
                             contrast, sharpness and size as received, by split (Evaluate's
                             monitoring baseline)

Every photo is judged by scripts/inference/photos.py, the rule serving uses too. Exact
duplicates (same bytes under two ids) are flagged and each group kept in one split, so the same
photo never sits in train and test. The split depends only on the sorted ids and labels of the
selection, their content hashes and --seed: the same across reruns, listing orders, worker and
instance counts; a photo that fails to decode leaves a gap instead of reshuffling the rest.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import photos  # staged next to preprocess.py by both executors (steps/preprocess.py)
except ImportError:  # a repo checkout: the one image rule lives with the serving code
    sys.path.insert(0, str(HERE.parent / "inference"))
    import photos
import abid
import ingest
import s3fetch
from abid import CLASSES, LAYOUT_ABID, LAYOUT_FOLDERS, InputError, Selection

SPLITS = ("train", "validation", "test")
JPEG_QUALITY = 90
STATISTICS_FILE = "image_statistics"  # report/image_statistics.json, with --statistics-side
EXAMPLES = 10  # how many ids the report lists for long lists (missing ids, ...)
RESOURCE_CONFIG = "/opt/ml/config/resourceconfig.json"
DEFERRED = "label deferred: metadata is fetched with the photo"


@dataclass(frozen=True)
class Candidate:
    """One image found in the input, with its label (or why it has none)."""

    id: str
    path: Path  # local file (for S3: where it is fetched to)
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
    statistics_side: int = 0  # > 0: measure photos.statistics of the photo as received, at this side


@dataclass(frozen=True)
class Result:
    """A worker's answer: the written size and source MD5, or the kind and reason of a rejection."""

    id: str
    kind: str | None
    reason: str | None
    width: int = 0
    height: int = 0
    md5: str = ""
    source_short_side: int = 0
    statistics: dict | None = None  # photos.statistics of the photo as the endpoint would receive it
    received: tuple[int, int] | None = None  # (width, height) upright, when the bytes are a JPEG to keep as is


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    host: str = ""

    def owns(self, unit: str) -> bool:
        digest = hashlib.sha256(unit.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


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


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def counts_arg(text: str) -> tuple[int, ...]:
    try:
        return abid.parse_counts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def shard_arg(text: str) -> Shard:
    """`auto` (SageMaker's resourceconfig.json, else one shard) or `I/N` (0-based I)."""
    if text == "auto":
        try:
            config = json.loads(Path(RESOURCE_CONFIG).read_text())
            hosts = sorted(config["hosts"])
            return Shard(hosts.index(config["current_host"]), len(hosts), config["current_host"])
        except (OSError, ValueError, KeyError):
            return Shard(0, 1)
    index, _, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count), f"shard{index}")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or I/N like 0/2, got {text!r}")
    if not 0 <= shard.index < shard.count:
        raise argparse.ArgumentTypeError(f"shard index must be in 0..N-1, got {text!r}")
    return shard


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
                   help="ABID bucket layout (bin-images/, metadata/) or one folder per count; "
                        "a local folder or an s3:// URI the step reads itself")
    p.add_argument("--manifest", default="/opt/ml/processing/input/manifest",
                   help="file_list.json-style manifest, or a folder holding one .json file; "
                        "a missing or empty path means no manifest")
    p.add_argument("--output", default="/opt/ml/processing/output")
    p.add_argument("--resize", type=positive_int, default=256,
                   help="short side in pixels (images are never upscaled)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", type=parse_split, default=(0.6, 0.2, 0.2),
                   help="train,validation,test fractions (default 0.6,0.2,0.2)")
    p.add_argument("--counts", type=counts_arg, default=CLASSES,
                   help="selection rule: the counts to keep, e.g. 1-5 or 1,3 (default 1-5)")
    p.add_argument("--per-count", type=non_negative_int, default=0,
                   help="selection rule: at most this many images per count, drawn with --seed "
                        "(default 0: all)")
    p.add_argument("--balance", action="store_true",
                   help="downsample every count to the smallest count's size (seeded)")
    p.add_argument("--min-size", type=positive_int, default=32,
                   help="reject images whose short side is below this")
    p.add_argument("--statistics-side", type=non_negative_int, default=0,
                   help="the model's image size: write report/image_statistics.json, every photo's "
                        "brightness, contrast, sharpness and size as received, for the monitoring "
                        "baseline (default 0: not written)")
    p.add_argument("--workers", type=positive_int, default=default_workers(),
                   help="processes decoding and resizing (default min(4, cpus))")
    p.add_argument("--fetch-workers", type=positive_int, default=16,
                   help="threads reading S3 (with an s3:// input)")
    p.add_argument("--s3-client", choices=("auto", "crt", "botocore"), default="auto",
                   help="what sends the GETs: the AWS Common Runtime (awscrt), botocore, or auto: "
                        "the CRT when awscrt is installed (default)")
    p.add_argument("--shard", type=shard_arg, default=Shard(0, 1),
                   help="auto (one shard per SageMaker processing instance) or I/N")
    p.add_argument("--scratch", default=None,
                   help="where an s3:// input is mirrored (default: a temporary folder)")
    return p


# ---------------------------------------------------------------------------------------------
# Manifest and input discovery


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


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def count_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and len(p.name) < 6),
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


def find_candidates(root: Path, layout: str) -> list[Candidate]:
    """Every image file with its label, in path order."""
    found = []
    if layout == LAYOUT_ABID:
        for path in visible_files(root / "bin-images"):
            label, error = abid.read_label(root / "metadata" / f"{path.stem}.json")
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


def process_image(task: Task) -> Result:
    """Decode fully through the shared rule, check, resize and stage one image.

    Never raises for bad image bytes: every failure becomes a (kind, reason) rejection.
    """
    try:
        data = Path(task.path).read_bytes()
    except OSError as e:
        return Result(task.id, "unreadable", f"cannot read file: {e.strerror or e}")
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    try:
        # JPEG decodes straight at 1/2..1/8 scale when that still covers the target size.
        rgb = photos.decode(data, min_side=task.min_size, draft=(task.resize, task.resize))
    except photos.ImageRejected as e:
        return Result(task.id, e.kind, e.reason, md5=md5)
    width, height = rgb.info["source_size"]
    stats = None
    if task.statistics_side:
        # The monitoring baseline's image statistics: of the photo as sent, decoded whole as the
        # endpoint decodes it, not of the resized copy the model trains on (whose size and
        # sharpness differ from every served photo's).
        whole = rgb if rgb.size == (width, height) else photos.decode(data, min_side=task.min_size)
        stats = photos.statistics(whole, task.statistics_side)
    size = target_size(width, height, task.resize)
    if size != rgb.size:
        rgb = rgb.resize(size, photos.Image.Resampling.BICUBIC)
    rgb.save(task.staged, "JPEG", quality=JPEG_QUALITY)
    received = (width, height) if photos.sniff_format(data[:16]) == "JPEG" else None
    return Result(task.id, None, None, *size, md5=md5, source_short_side=min(width, height), statistics=stats,
                  received=received)


def run_tasks(tasks: list[Task], workers: int) -> list[Result]:
    if workers <= 1 or len(tasks) < 2:
        return [process_image(t) for t in tasks]
    chunk = max(1, min(32, len(tasks) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(process_image, tasks, chunksize=chunk))


# ---------------------------------------------------------------------------------------------
# Selection, duplicates and the plan


def examples(items) -> list:
    return sorted(items)[:EXAMPLES]


def select(candidates: list[Candidate], manifest: dict[str, int] | None, rule: Selection):
    """Apply duplicate-id, manifest, label and selection rules: (accepted, rejections, info)."""
    rejections: list[dict] = []
    labelled: list[Candidate] = []
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
            reject(c, "out_of_range", f"count {abid.describe_count(c.label)} outside 1-5")
        elif manifest is not None and manifest[c.id] != c.label:
            reject(c, "manifest_mismatch",
                   f"manifest says {manifest[c.id]}, {c.label_source} says {c.label}")
        else:
            labelled.append(c)
    accepted = labelled
    if rule.active:
        keep = set(abid.select({c.id: c.label for c in labelled}, rule))
        accepted = [c for c in labelled if c.id in keep]
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


def duplicate_units(accepted: list[Candidate], content: dict[str, str | None], rejections: list[dict]):
    """Group exact duplicates (same content hash) into one unit each: {unit: [ids]}.

    A unit is named by its smallest id. A group whose members disagree on the count cannot be
    trusted either way: every member is rejected."""
    groups: dict[str, list[Candidate]] = {}
    for c in accepted:
        key = content.get(c.id) or f"id:{c.id}"  # unknown content (multipart ETag): its own unit
        groups.setdefault(key, []).append(c)
    units: dict[str, list[Candidate]] = {}
    duplicates = []
    for key, members in groups.items():
        members.sort(key=lambda c: c.id)
        if len(members) > 1:
            labels = sorted({c.label for c in members})
            ids = [c.id for c in members]
            duplicates.append({"md5": key, "ids": ids, "counts": labels})
            if len(labels) > 1:
                for c in members:
                    rejections.append({"id": c.id, "path": c.rel, "kind": "duplicate_conflict",
                                       "reason": f"same photo as {', '.join(i for i in ids if i != c.id)} "
                                                 f"with another count ({'/'.join(map(str, labels))})"})
                continue
        units[members[0].id] = members
    duplicates.sort(key=lambda d: d["ids"])
    return units, duplicates


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
# Reading S3 (the step fetches exactly the selected objects itself)


def s3_candidates(args, manifest: dict[str, int] | None, rule: Selection, scratch: Path):
    """Candidates for an s3:// input, their metadata fetched into `scratch` (labels are needed
    for the whole selection on every shard); images are fetched later, only the shard's."""
    bucket, prefix = s3fetch.parse_s3_uri(args.input)
    client = s3fetch.make_client(args.fetch_workers)
    region = s3fetch.check_bucket(client, bucket)
    reader = s3fetch.make_reader(client, args.fetch_workers, args.s3_client, region=region)
    mirror = s3fetch.Mirror(client, bucket, prefix, scratch, reader)
    if manifest is not None and not rule.active and args.shard.count == 1:
        # The common case (the reference recipe): nothing needs a label before the photos are in,
        # so each id's metadata is read (into memory) beside its photo, while earlier photos decode.
        return [Candidate(i, scratch / ingest.image_key(i), ingest.image_key(i), None, DEFERRED)
                for i in sorted(manifest)], mirror
    metas = ingest.resolve_selection(mirror, manifest, rule, args.fetch_workers)
    candidates = []
    for image_id, meta in metas.items():
        label, error = ingest.label_of(meta)
        rel = ingest.image_key(image_id)
        candidates.append(Candidate(image_id, scratch / rel, rel, label, error))
    return candidates, mirror


def s3_content_ids(mirror, accepted: list[Candidate], workers: int) -> dict[str, str | None]:
    """Content identity of every selected image without reading it: its ETag, which is the MD5
    of its bytes for single-part uploads (None otherwise: such a photo is its own unit)."""
    with s3fetch.progress(len(accepted), "etags") as bar:
        heads = s3fetch.run_parallel(lambda c: mirror.head_etag(c.rel), accepted, workers, bar)
    return {c.id: s3fetch.plain_etag(etag) for c, (etag, _, _) in zip(accepted, heads)}


def fetch_label(mirror, image_id: str) -> tuple[int | None, str | None]:
    """A deferred label: the id's metadata read into memory (verified like a file, never written)
    and judged by the rule a local metadata file is judged by."""
    return ingest.label_of_read(mirror.read(ingest.metadata_key(image_id), abid.MAX_METADATA_BYTES))


def fetch_and_process(mirror, candidates: list[Candidate], tasks: dict[str, Task],
                      workers: int, fetch_workers: int, labels: dict | None = None) -> list[Result]:
    """Download and decode at once: each photo goes to a decoding process as soon as it lands
    (with its metadata first, when its label was deferred)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    def fetch(c: Candidate):
        if c.label_error == DEFERRED:
            labels[c.id] = fetch_label(mirror, c.id)
        return mirror.fetch(c.rel)

    results: list[Result] = []
    with s3fetch.progress(len(candidates), "photos") as bar, \
            ThreadPoolExecutor(fetch_workers) as fetchers, \
            ProcessPoolExecutor(max(1, workers)) as pool:
        fetches = {fetchers.submit(fetch, c): c for c in candidates}
        decoding = []
        for future in as_completed(fetches):
            c, got = fetches[future], future.result()
            if got.ok:
                decoding.append(pool.submit(process_image, tasks[c.id]))
            else:
                results.append(Result(c.id, got.status if got.status == "missing" else "fetch_failed",
                                      got.reason))
                bar.update(1)
        for future in as_completed(decoding):
            results.append(future.result())
            bar.update(1)
    return results


# ---------------------------------------------------------------------------------------------
# The job


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
                results: dict[str, Result], index_name: str, sources: dict[str, str] | None = None) -> None:
    """The split's photos and index. With `sources` (the test split), each JPEG is kept as it
    was received, byte for byte: Evaluate then scores, and its monitoring baseline describes, the
    photos the endpoint will be sent, not copies resized and re-encoded for training."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in sorted(ids_by_count):
        (folder / str(count)).mkdir(exist_ok=True)
        for image_id in ids_by_count[count]:
            r = results[image_id]
            target = folder / str(count) / f"{image_id}.jpg"
            if sources is not None and r.received is not None:
                shutil.copyfile(sources[image_id], target)
                (staging / f"{image_id}.jpg").unlink()
                rows.append((image_id, count, *r.received, r.md5))
                continue
            # move, not os.replace: the split folders may be separate mounts in a container
            shutil.move(staging / f"{image_id}.jpg", target)
            rows.append((image_id, count, r.width, r.height, r.md5))
    with open(folder / index_name, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "count", "width", "height", "md5"))
        writer.writerows(rows)


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the data report (also written under report/)."""
    start = time.perf_counter()
    manifest_path = resolve_manifest(args.manifest)
    manifest = abid.load_manifest(manifest_path) if manifest_path else None
    rule = Selection(tuple(args.counts), args.per_count, args.seed)
    shard: Shard = args.shard
    out = Path(args.output)
    try:
        staging = prepare_output(out)
    except OSError as e:
        raise InputError(f"cannot write to output folder {out}: {e}") from None

    from_s3 = str(args.input).startswith("s3://")
    scratch_owner = None
    if from_s3:
        if args.scratch:
            scratch = Path(args.scratch)
        else:
            scratch_owner = tempfile.TemporaryDirectory(prefix="abid-")
            scratch = Path(scratch_owner.name)
        layout = LAYOUT_ABID
        candidates, mirror = s3_candidates(args, manifest, rule, scratch)
    else:
        root = Path(args.input)
        layout = detect_layout(root)
        candidates = find_candidates(root, layout)
    try:
        return _process(args, start, layout, manifest, manifest_path, rule, shard, out, staging,
                        candidates, mirror if from_s3 else None)
    finally:
        if from_s3:
            mirror.close()
        if scratch_owner is not None:
            scratch_owner.cleanup()


def _process(args, start, layout, manifest, manifest_path, rule, shard, out, staging,
             candidates, mirror) -> dict:
    tasks = {c.id: Task(c.id, str(c.path), str(staging / f"{c.id}.jpg"), args.resize, args.min_size,
                        args.statistics_side) for c in candidates}
    prefetched = None
    if any(c.label_error == DEFERRED for c in candidates):
        labels: dict = {}
        prefetched = {r.id: r for r in fetch_and_process(mirror, candidates, tasks, args.workers,
                                                         args.fetch_workers, labels)}
        candidates = [Candidate(c.id, c.path, c.rel, *labels[c.id]) for c in candidates]
    accepted, rejections, manifest_info = select(candidates, manifest, rule)
    selected = len(accepted)

    def process(cands: list[Candidate]) -> list[Result]:
        if mirror is not None:
            return fetch_and_process(mirror, cands, tasks, args.workers, args.fetch_workers)
        return run_tasks([tasks[c.id] for c in cands], args.workers)

    if shard.count > 1:
        # Every shard plans the same split over the whole selection, so duplicate groups and
        # the stratification need every photo's content identity first (ETag / MD5).
        if mirror is not None:
            content = s3_content_ids(mirror, accepted, args.fetch_workers)
        else:
            content = {c.id: hashlib.md5(c.path.read_bytes(), usedforsecurity=False).hexdigest()
                       if c.path.is_file() else None for c in accepted}
        units, duplicates = duplicate_units(accepted, content, rejections)
        mine = [c for unit, members in units.items() if shard.owns(unit) for c in members]
        results = {r.id: r for r in process(mine)}
    else:
        if prefetched is not None:
            results = {c.id: prefetched[c.id] for c in accepted}
        else:
            results = {r.id: r for r in process(accepted)}
        content = {i: r.md5 or None for i, r in results.items()}
        units, duplicates = duplicate_units(accepted, content, rejections)

    by_id = {c.id: c for c in accepted}
    for r in results.values():
        if r.kind is not None:
            rejections.append({"id": r.id, "path": by_id[r.id].rel, "kind": r.kind, "reason": r.reason})
    # The plan: units (duplicate groups) by count, balanced and split the same on every shard.
    unit_ids: dict[int, list[str]] = {k: [] for k in CLASSES}
    for unit, members in units.items():
        unit_ids[members[0].label].append(unit)
    kept = balance(unit_ids, args.seed) if args.balance else unit_ids
    plan = split_ids(kept, args.split, args.seed)
    in_units = {c.id for members in units.values() for c in members}
    ok = {i for i, r in results.items() if r.kind is None and i in in_units}
    splits = {s: {k: sorted(c.id for u in plan[s][k] for c in units[u] if c.id in ok)
                  for k in plan[s]} for s in SPLITS}
    suffix = f"-{shard.host or shard.index}" if shard.count > 1 else ""
    for split in SPLITS:
        write_split(out, split, splits[split], staging, results, f"manifest{suffix}.csv",
                    {i: tasks[i].path for ids in splits[split].values() for i in ids} if split == "test" else None)
    shutil.rmtree(staging)  # what is left there was dropped by --balance or a conflict

    rejections.sort(key=lambda r: (r["path"], r["reason"]))
    written = {s: {str(k): len(v) for k, v in splits[s].items()} for s in SPLITS}
    sizes = [results[i] for i in ok]
    planned = {s: sum(len(units[u]) for k in plan[s] for u in plan[s][k]) for s in SPLITS}
    report = {
        "input": str(args.input),
        "layout": layout,
        "manifest": str(manifest_path) if manifest_path else None,
        "manifest_argument": args.manifest,
        "manifest_summary": manifest_info or None,
        "selection": rule.describe() if rule.active else None,
        "shard": {"index": shard.index, "count": shard.count, "host": shard.host} if shard.count > 1 else None,
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
            "processed_here": len(results),
            "valid": len(ok),
            "rejected": len(rejections),
            "duplicate_groups": len(duplicates),
            "dropped_by_balance": sum(len(v) for v in unit_ids.values()) - sum(len(v) for v in kept.values()),
            "kept_below_resize": sum(r.source_short_side < args.resize for r in sizes),
            "written": sum(sum(v.values()) for v in written.values()),
        },
        "planned_per_split": planned,
        "counts": {s: {**written[s], "total": sum(written[s].values())} for s in SPLITS},
        "counts_per_class": {str(k): sum(written[s][str(k)] for s in SPLITS) for k in CLASSES},
        "rejections_by_kind": count_kinds(rejections),
        "rejections": rejections,
        "duplicates": duplicates,
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / f"data_report{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.statistics_side:
        write_statistics(out / "report" / f"{STATISTICS_FILE}{suffix}.json", args.statistics_side, splits, results)
    return report


def write_statistics(path: Path, side: int, splits: dict, results: dict[str, Result]) -> None:
    """Every written photo's photos.statistics, by split: Evaluate's monitoring baseline takes them
    from here (all splits: image statistics are not fitted by training, and more photos make a
    steadier reference)."""
    rows = [(split, results[i].statistics) for split in SPLITS for ids in splits[split].values() for i in ids
            if results[i].statistics is not None]
    names = list(photos.STATISTICS)
    document = {"side": side, "names": names, "photos": len(rows),
                "split": [split for split, _ in rows],
                "values": {name: [stats[name] for _, stats in rows] for name in names}}
    path.write_text(json.dumps(document) + "\n")


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
    except (InputError, s3fetch.FetchError) as e:
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
