"""The locked part of a photo set: split off once, seeded, stratified by count, and seen by no
recipe choice, so the score a recipe gets on it is a score on photos it was never chosen on
(docs/model.md, "The locked part").

Which photos are locked: within each count, the `fraction` of them (rounded) whose SHA-256 of
"<seed>:<id>" sorts first. So the split depends on the set of photo ids alone, never on the order
a folder lists its files in or on the machine, and each count keeps its share exactly.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

FRACTION = 0.2
SEED = "invmon-locked-1"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def rank(photo_id: str, seed: str = SEED) -> str:
    return hashlib.sha256(f"{seed}:{photo_id}".encode()).hexdigest()


def locked_ids(by_count: dict[str, list[str]], fraction: float = FRACTION, seed: str = SEED) -> set[str]:
    """The ids of the locked part: `fraction` of each count's ids, chosen by `rank`."""
    if not 0 < fraction < 1:
        raise ValueError(f"the locked fraction must be between 0 and 1, got {fraction}")
    chosen: set[str] = set()
    for ids in by_count.values():
        if len(set(ids)) != len(ids):
            raise ValueError("a photo id appears twice in one count")
        chosen.update(sorted(ids, key=lambda i: rank(i, seed))[:round(fraction * len(ids))])
    return chosen


def read_folder(data: Path) -> dict[str, list[Path]]:
    """DIR/<count>/<id>.jpg -> {count: [paths]}; an id in two counts is refused (one label each)."""
    by_count = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in SUFFIXES)
                for d in sorted(Path(data).iterdir()) if d.is_dir() and d.name.isdigit()}
    if not any(by_count.values()):
        raise ValueError(f"no photos in one folder per count under {data}")
    seen: dict[str, str] = {}
    for count, paths in by_count.items():
        for path in paths:
            if seen.setdefault(path.stem, count) != count:
                raise ValueError(f"photo {path.stem} is in both {seen[path.stem]}/ and {count}/")
    return by_count


def split(data: Path, fraction: float = FRACTION, seed: str = SEED) -> tuple[dict, dict]:
    """({count: [paths]} of the rest, the same of the locked part) of a one-folder-per-count set."""
    by_count = read_folder(data)
    locked = locked_ids({c: [p.stem for p in paths] for c, paths in by_count.items()}, fraction, seed)
    return ({c: [p for p in paths if p.stem not in locked] for c, paths in by_count.items()},
            {c: [p for p in paths if p.stem in locked] for c, paths in by_count.items()})


def write(data: Path, out: Path, fraction: float = FRACTION, seed: str = SEED) -> dict[str, int]:
    """out/rest/<count>/ and out/locked/<count>/, hard links where the file system allows (copies
    otherwise), and out/locked.txt listing the locked ids. Returns the number of photos on each side."""
    rest, locked = split(data, fraction, seed)
    for side, by_count in (("rest", rest), ("locked", locked)):
        for count, paths in by_count.items():
            folder = out / side / count
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                target = folder / path.name
                if not target.exists():
                    try:
                        os.link(path, target)
                    except OSError:
                        target.write_bytes(path.read_bytes())
    ids = sorted(p.stem for paths in locked.values() for p in paths)
    (out / "locked.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"rest": sum(map(len, rest.values())), "locked": len(ids)}
