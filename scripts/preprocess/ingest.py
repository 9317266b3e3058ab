"""Mirror a selection of ABID from S3 into a local folder, checked, with a report.

    python ingest.py --source s3://aft-vbi-pds/ --manifest file_list.json --out DIR [--workers 16]
    python ingest.py --source s3://aft-vbi-pds/ --counts 1-5 --per-count 2000 --seed 42 --out DIR

`invmon data fetch` and the local runner (for `invmon run --data s3://...`) run this code;
Preprocess reads S3 through the same selection and fetch functions. DIR gets the ABID layout
(bin-images/<id>.jpg, metadata/<id>.json) and fetch_report.json, which names every missing,
corrupt, truncated, zero-byte, unlabelled or label-mismatched file with its reason, and every
group of exact duplicates. Photos are judged by photos.py and labels by abid.py, exactly as
Preprocess judges them. A rerun fetches only what is missing or damaged and writes the same
mirror and the same report as an uninterrupted run (the report holds no timings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import photos  # beside it in the container; preprocess.py, the entry point, finds it in a checkout
import abid
import s3fetch
from abid import CLASSES, InputError, Selection

REPORT = "fetch_report.json"
WALK_BATCH = 256


def image_key(image_id: str) -> str:
    return f"bin-images/{image_id}.jpg"


def metadata_key(image_id: str) -> str:
    return f"metadata/{image_id}.json"


def resolve_selection(mirror: s3fetch.Mirror, manifest: dict[str, int] | None, rule: Selection,
                      workers: int, bar_desc: str = "metadata") -> dict[str, s3fetch.Fetched]:
    """The selected ids, each with its metadata fetched into the mirror: {id: Fetched}.

    With a manifest the keys come from it (the bucket is never listed). Without one the
    metadata/ prefix is listed; a selection rule then learns labels one GET at a time in the
    rule's walk order and stops once every count's quota is full (a 2,000-per-count draw reads
    about 10k metadata files, not 535k). The rule itself is applied later, by the caller, to
    the labels: walking only a prefix of the order picks the same ids as walking all of it."""
    if manifest is not None:
        ids = sorted(manifest)
    else:
        ids = sorted({Path(k).stem for k in mirror.list("metadata/") if k.endswith(".json")})

    def fetch_meta(image_id: str) -> s3fetch.Fetched:
        return mirror.fetch(metadata_key(image_id))

    if manifest is None and rule.active and rule.per_count:
        order = abid.walk_order(ids, rule.seed)
        found: dict[str, s3fetch.Fetched] = {}
        labels: dict[str, int | None] = {}
        for start in range(0, len(order), WALK_BATCH):
            chunk = order[start:start + WALK_BATCH]
            for image_id, got in zip(chunk, s3fetch.run_parallel(fetch_meta, chunk, workers)):
                found[image_id] = got
                labels[image_id] = abid.read_label(got.path)[0] if got.ok else None
            taken = sum(1 for _ in abid.take_while_open(order[:start + len(chunk)], labels.get, rule))
            if taken >= rule.per_count * len(rule.counts):
                break
        return dict(sorted(found.items()))
    with s3fetch.progress(len(ids), bar_desc) as bar:
        got = s3fetch.run_parallel(fetch_meta, ids, workers, bar, lambda g: not g.ok)
    return dict(zip(ids, got))


def label_of(meta: s3fetch.Fetched) -> tuple[int | None, str | None]:
    """A fetched metadata file's label, or why there is none (the rule Preprocess applies)."""
    if meta.status == "failed":
        return None, f"unlabelled: metadata {meta.reason}"
    return abid.read_label(meta.path)


def label_of_read(meta: s3fetch.Read) -> tuple[int | None, str | None]:
    """The same judgement for metadata read into memory (Preprocess reading S3 itself)."""
    if meta.status == "missing":
        return None, "unlabelled: missing metadata"
    if meta.status == "failed":
        return None, f"unlabelled: metadata {meta.reason}"
    if meta.size > abid.MAX_METADATA_BYTES or meta.size != len(meta.body):  # over the limit read
        return None, f"unlabelled: metadata is {meta.size:,} bytes, not an ABID metadata file"
    return abid.label_from_metadata(meta.body)


@dataclass(frozen=True)
class Checked:
    id: str
    label: int | None
    md5: str | None
    problems: tuple[dict, ...]


def check_one(mirror: s3fetch.Mirror, image_id: str, meta: s3fetch.Fetched,
              expected: int | None, min_size: int) -> Checked:
    """Fetch one photo and judge it and its label as Preprocess would."""
    problems: list[dict] = []

    def problem(key: str, kind: str, reason: str) -> None:
        problems.append({"id": image_id, "file": key, "kind": kind, "reason": reason})

    label, error = label_of(meta)
    if error:
        problem(metadata_key(image_id), "unlabelled", error)
    elif label not in CLASSES:
        problem(metadata_key(image_id), "out_of_range", f"count {abid.describe_count(label)} outside 1-5")
    elif expected is not None and expected != label:
        problem(metadata_key(image_id), "label_mismatch", f"manifest says {expected}, metadata says {label}")

    got = mirror.fetch(image_key(image_id))
    md5 = None
    if got.status == "missing":
        problem(image_key(image_id), "missing", got.reason)
    elif not got.ok:
        problem(image_key(image_id), "fetch_failed", got.reason)
    else:
        entry = mirror.ledger.entries.get(image_key(image_id))
        md5 = entry["md5"] if entry else None
        try:
            photos.decode(got.path, min_side=min_size)
        except photos.ImageRejected as e:
            kind = "zero_byte" if e.kind == "empty" else e.kind
            problem(image_key(image_id), kind, e.reason)
    return Checked(image_id, label, md5, tuple(problems))


def write_json_atomic(path: Path, document: dict) -> None:
    tmp = path.with_name(f".{path.name}{s3fetch.PART}{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def fetch_dataset(source: str, out: Path, manifest_path: Path | None = None,
                  rule: Selection = Selection(), workers: int = 16, min_size: int = 32,
                  anonymous: bool | None = None, echo=print, s3_client: str = "auto") -> dict:
    """Mirror the selection into `out` and write out/fetch_report.json. Returns the report.
    `s3_client` picks what sends the GETs (s3fetch.make_reader)."""
    started = time.perf_counter()
    manifest = abid.load_manifest(manifest_path) if manifest_path else None
    bucket, prefix = s3fetch.parse_s3_uri(source)
    client = s3fetch.make_client(workers, anonymous)
    region = s3fetch.check_bucket(client, bucket)
    mirror = s3fetch.Mirror(client, bucket, prefix, out,
                            s3fetch.make_reader(client, workers, s3_client, anonymous, region))
    metas = resolve_selection(mirror, manifest, rule, workers)

    ids = list(metas)
    if rule.active:  # the rule walks the usable labels, as Preprocess's selection does
        labels = {}
        for i, meta in metas.items():
            label = label_of(meta)[0]
            agrees = manifest is None or manifest[i] == label
            labels[i] = label if label in CLASSES and agrees else None
        ids = sorted(abid.select(labels, rule))
    with s3fetch.progress(len(ids), "photos") as bar:
        checked: list[Checked] = s3fetch.run_parallel(
            lambda i: check_one(mirror, i, metas[i], manifest.get(i) if manifest else None, min_size),
            ids, workers, bar, lambda c: bool(c.problems))
    mirror.close()

    problems = sorted((p for c in checked for p in c.problems), key=lambda p: (p["id"], p["file"]))
    good = [c for c in checked if not c.problems]
    by_md5: dict[str, list[str]] = {}
    for c in checked:
        if c.md5:
            by_md5.setdefault(c.md5, []).append(c.id)
    duplicates = sorted(({"md5": m, "ids": sorted(v)} for m, v in by_md5.items() if len(v) > 1),
                        key=lambda d: d["ids"])
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    report = {
        "source": f"s3://{bucket}/{prefix}",
        "manifest": ({"name": manifest_path.name,
                      "sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
                      "ids": len(manifest)} if manifest_path and manifest is not None else None),
        "selection": rule.describe() if rule.active else None,
        "requested": len(ids),
        "usable": len(good),
        "usable_per_class": {str(k): sum(c.label == k for c in good) for k in CLASSES},
        "problems_by_kind": dict(sorted(kinds.items())),
        "problems": problems,
        "duplicates": duplicates,
    }
    write_json_atomic(out / REPORT, report)
    seconds = time.perf_counter() - started
    echo(f"fetched {len(ids)} photos from {report['source']} into {out} in {seconds:.1f} s "
         f"({len(ids) / max(seconds, 1e-9):.1f} photos/s): {len(good)} usable, "
         f"{len(problems)} problem(s){' (' + ', '.join(f'{k} {v}' for k, v in kinds.items()) + ')' if kinds else ''}, "
         f"{len(duplicates)} duplicate group(s); report: {out / REPORT}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="s3://aft-vbi-pds/", help="S3 URI of the ABID layout")
    p.add_argument("--manifest", type=Path, help="file_list.json-style manifest")
    p.add_argument("--out", type=Path, required=True, help="local folder for the mirror")
    p.add_argument("--workers", type=int, default=16, help="concurrent requests (default 16)")
    p.add_argument("--counts", default="1-5", help="selection rule: counts to keep (e.g. 1-5)")
    p.add_argument("--per-count", type=int, default=0, help="selection rule: images per count (0 = all)")
    p.add_argument("--seed", type=int, default=42, help="selection rule: seed of the draw")
    p.add_argument("--min-size", type=int, default=32, help="reject photos whose short side is below")
    p.add_argument("--no-sign-request", action="store_true",
                   help="anonymous requests even when credentials are configured")


def rule_from(args) -> Selection:
    if args.workers < 1 or args.per_count < 0:
        raise InputError("--workers must be >= 1 and --per-count >= 0")
    try:
        return Selection(abid.parse_counts(args.counts), args.per_count, args.seed)
    except ValueError as e:
        raise InputError(str(e)) from None


def run_from_args(args, echo=print) -> dict:
    if args.manifest is not None and not args.manifest.is_file():
        raise InputError(f"manifest {args.manifest} does not exist")
    return fetch_dataset(args.source, args.out, args.manifest, rule_from(args), args.workers,
                         args.min_size, True if args.no_sign_request else None, echo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_from_args(args)
    except (InputError, s3fetch.FetchError) as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
