"""What an ABID dataset is made of, wherever it lives: layouts, manifests, labels, selection.

Shared by Preprocess (on a local folder or reading S3 itself) and `invmon data fetch`, so that
an image is selected, labelled and judged by one set of rules. Standard library only.

Layouts:
  abid-bucket    bin-images/<id>.jpg + metadata/<id>.json (label = EXPECTED_QUANTITY)
  count-folders  1/<id>.jpg ... 5/<id>.jpg (label = folder name)
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CLASSES = (1, 2, 3, 4, 5)
LAYOUT_ABID = "abid-bucket"
LAYOUT_FOLDERS = "count-folders"
# A metadata file is a few KB; anything far larger is not one (and is never parsed whole).
MAX_METADATA_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20


class InputError(Exception):
    """Bad input as a whole (no such folder, unknown layout, unreadable manifest)."""


@dataclass(frozen=True)
class Selection:
    """A rule applied to the labels: which counts, how many of each, drawn with which seed."""

    counts: tuple[int, ...] = CLASSES
    per_count: int = 0  # 0 = all
    seed: int = 42

    @property
    def active(self) -> bool:
        return self.per_count > 0 or self.counts != CLASSES

    def describe(self) -> dict:
        return {"counts": list(self.counts), "per_count": self.per_count, "seed": self.seed}


def parse_counts(text: str) -> tuple[int, ...]:
    """`1-5`, `2,3` or `1-2,5` -> sorted counts within 1-5."""
    counts: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            low, _, high = part.partition("-")
            counts.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"expected counts like 1-5 or 1,3,5, got {text!r}") from None
    if not counts or not counts <= set(CLASSES):
        raise ValueError(f"counts must lie within 1-5, got {text!r}")
    return tuple(sorted(counts))


def parse_json(text: str | bytes):
    """json.loads that turns every way a hostile file can break the parser into one ValueError:
    deep nesting (RecursionError), huge integers (ValueError), bad UTF-8, bad syntax."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({type(e).__name__})") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"unreadable JSON value ({e})") from None


def label_from_metadata(raw: bytes) -> tuple[int | None, str | None]:
    """EXPECTED_QUANTITY from the bytes of an ABID metadata file, or (None, why not)."""
    if len(raw) > MAX_METADATA_BYTES:
        return None, f"unlabelled: metadata is {len(raw):,} bytes, not an ABID metadata file"
    try:
        data = parse_json(raw)
    except ValueError as e:
        return None, f"unlabelled: unparseable metadata ({e})"
    if not isinstance(data, dict) or "EXPECTED_QUANTITY" not in data:
        return None, "unlabelled: metadata has no EXPECTED_QUANTITY"
    value = data["EXPECTED_QUANTITY"]
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"unlabelled: invalid EXPECTED_QUANTITY {str(value)[:40]!r}"
    return value, None


def describe_count(value: int) -> str:
    """A count for a message: a hostile 4,000-digit integer is not printed whole."""
    return str(value) if abs(value) < 10**9 else f"a {len(str(abs(value)))}-digit number"


def read_label(meta: Path) -> tuple[int | None, str | None]:
    """EXPECTED_QUANTITY from an ABID metadata file, or (None, why it is unusable)."""
    try:
        if not meta.is_file():
            return None, "unlabelled: missing metadata"
        if meta.stat().st_size > MAX_METADATA_BYTES:
            return None, f"unlabelled: metadata is {meta.stat().st_size:,} bytes, not an ABID metadata file"
        return label_from_metadata(meta.read_bytes())
    except OSError as e:
        return None, f"unlabelled: unreadable metadata ({e.strerror or e})"


def load_manifest(path: Path) -> dict[str, int]:
    """file_list.json ({"1": ["data/metadata/100313.json", ...], ...}) -> {image id: count}."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"manifest {path} is over {MAX_MANIFEST_BYTES >> 20} MiB")
        data = parse_json(path.read_bytes())
    except OSError as e:
        raise InputError(f"manifest {path} is not readable: {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(f"manifest {path} is not readable JSON: {e}") from None
    return manifest_ids(data, str(path))


def manifest_ids(data, name: str) -> dict[str, int]:
    if not isinstance(data, dict):
        raise InputError(f"manifest {name} must be a JSON object of count -> list of files")
    ids: dict[str, int] = {}
    for key, entries in data.items():
        try:
            count = int(key) if len(key) < 10 else None
        except ValueError:
            count = None
        if count is None:
            raise InputError(f"manifest {name}: key {key[:20]!r} is not a count")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(f"manifest {name}: the value of {key!r} must be a list of paths")
        for entry in entries:
            image_id = Path(entry.replace("\\", "/")).stem
            if not image_id or "/" in image_id or image_id.startswith("."):
                raise InputError(f"manifest {name}: entry {entry[:60]!r} names no image id")
            if ids.get(image_id, count) != count:
                raise InputError(f"manifest {name}: id {image_id} is listed under both "
                                 f"{ids[image_id]} and {count}")
            ids[image_id] = count
    return ids


def select(labels: dict[str, int], rule: Selection) -> list[str]:
    """The ids a selection rule keeps: a seeded walk over all ids in one shuffled order, taking an
    id while its count's quota is open. The walk order depends only on the ids and the seed, so
    a reader that learns labels lazily (S3: one metadata GET at a time) picks the same ids."""
    order = walk_order(labels, rule.seed)
    return [i for i in take_while_open(order, labels.get, rule)]


def walk_order(ids, seed: int) -> list[str]:
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return order


def take_while_open(order, label_of, rule: Selection):
    """Yield ids from `order` whose label is selected and whose count's quota is still open."""
    taken = {c: 0 for c in rule.counts}
    for image_id in order:
        if rule.per_count and all(n >= rule.per_count for n in taken.values()):
            return
        label = label_of(image_id)
        if label in taken and (not rule.per_count or taken[label] < rule.per_count):
            taken[label] += 1
            yield image_id
