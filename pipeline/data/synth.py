"""The embedded default data: deterministic synthetic bin photos in ABID bucket layout.

    out/bin-images/<id>.jpg   a bin seen from the front with 1-5 items, tape strips across it
    out/metadata/<id>.json    {"BIN_FCSKU_DATA": {asin: {...one entry per item...}},
                               "EXPECTED_QUANTITY": n, "image_fname": "<id>.jpg"}
    out/synth.json            how the set was made (and the marker that lets us overwrite it)

Every image is drawn from its own numpy Generator seeded with (seed, image index), so the bytes
depend only on the seed and the index: identical across runs and worker counts.

The pictures are made to be counted by a small CNN at 96 px: items have an outline and a
colour that stands out from the cardboard, and overlap only partly; what makes it not trivial
is the spread of sizes, shapes and colours, tape strips over the items, a label sticker, uneven
light, blur and noise.

    python -m pipeline.data.synth OUT [--per-class N] [--seed S] [--workers N]
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = (1, 2, 3, 4, 5)
JPEG_QUALITY = 90
SUPERSAMPLE = 2  # draw at 2x and shrink: smooth edges without slow antialiased drawing
MARKER = "synth.json"
# Items may overlap; centres stay at least this fraction of the summed radii apart, so a
# later item never hides most of an earlier one.
OVERLAP = 0.85
# Items differ from the back wall by at least this much (sum of |dR|+|dG|+|dB|): visible at 96 px.
MIN_CONTRAST = 120

# Bin wall tones: cardboard, yellowish plastic, gray tote.
BIN_TONES = ((196, 174, 132), (214, 198, 150), (160, 158, 152), (180, 150, 110))
ITEM_KINDS = ("box", "pouch", "bottle")


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def clamp(v: float) -> int:
    return int(min(255, max(0, v)))  # plain Python: np.clip on scalars dominated the run time


def jitter(rng: np.random.Generator, color, amount: int) -> tuple[int, ...]:
    return tuple(clamp(c + rng.integers(-amount, amount + 1)) for c in color)


def shade(color, factor: float) -> tuple[int, ...]:
    return tuple(clamp(c * factor) for c in color)


def item_color(rng: np.random.Generator, avoid=None) -> tuple[int, int, int]:
    """A packaging colour: any hue, fairly saturated, and not too close to `avoid` (the wall)."""
    for _ in range(20):
        color = random_color(rng)
        if avoid is None or sum(abs(a - b) for a, b in zip(color, avoid)) >= MIN_CONTRAST:
            break
    return color


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    h = rng.random()
    s = rng.uniform(0.45, 0.95)
    v = rng.uniform(0.25, 0.95)
    if rng.random() < 0.15:  # white or black packaging exists too
        s, v = rng.uniform(0, 0.1), rng.choice([rng.uniform(0.08, 0.2), rng.uniform(0.9, 1.0)])
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def transform(points, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def ellipse_points(rx: float, ry: float, n: int = 28, ox: float = 0.0, oy: float = 0.0):
    return [(ox + rx * math.cos(2 * math.pi * i / n), oy + ry * math.sin(2 * math.pi * i / n))
            for i in range(n)]


def rect_points(w: float, h: float, ox: float = 0.0, oy: float = 0.0):
    return [(ox - w / 2, oy - h / 2), (ox + w / 2, oy - h / 2),
            (ox + w / 2, oy + h / 2), (ox - w / 2, oy + h / 2)]


def capsule_points(w: float, h: float, n: int = 8):
    """A vertical rounded rectangle (bottle body): semicircle ends of radius w/2."""
    r = w / 2
    top = [(r * math.cos(math.pi + math.pi * i / n), -h / 2 + r + r * math.sin(math.pi + math.pi * i / n))
           for i in range(n + 1)]
    bottom = [(r * math.cos(math.pi * i / n), h / 2 - r + r * math.sin(math.pi * i / n))
              for i in range(n + 1)]
    return top + bottom


# ---------------------------------------------------------------------------------------------
# Items: each is a list of (polygon in item coordinates, colour) drawn in order


def box_parts(rng, size: float, color):
    w, h = size * rng.uniform(0.8, 1.25), size * rng.uniform(0.6, 1.1)
    depth = size * rng.uniform(0.12, 0.25)
    front = rect_points(w, h, 0, depth / 2)
    top = [(-w / 2, -h / 2 + depth / 2), (-w / 2 + depth, -h / 2 - depth / 2),
           (w / 2 + depth, -h / 2 - depth / 2), (w / 2, -h / 2 + depth / 2)]
    side = [(w / 2, -h / 2 + depth / 2), (w / 2 + depth, -h / 2 - depth / 2),
            (w / 2 + depth, h / 2 - depth / 2), (w / 2, h / 2 + depth / 2)]
    parts = [(front, color), (top, shade(color, 1.25)), (side, shade(color, 0.7))]
    if rng.random() < 0.6:  # a printed label on the front
        lw, lh = w * rng.uniform(0.3, 0.6), h * rng.uniform(0.2, 0.4)
        parts.append((rect_points(lw, lh, rng.uniform(-0.15, 0.15) * w, depth / 2),
                      jitter(rng, (235, 235, 230), 15)))
    return parts


def pouch_parts(rng, size: float, color):
    rx, ry = size * rng.uniform(0.5, 0.75), size * rng.uniform(0.35, 0.55)
    highlight = ellipse_points(rx * 0.45, ry * 0.35, 16, -rx * 0.25, -ry * 0.3)
    return [(ellipse_points(rx, ry), color), (highlight, shade(color, 1.35))]


def bottle_parts(rng, size: float, color):
    w, h = size * rng.uniform(0.45, 0.62), size * rng.uniform(1.3, 1.7)
    neck_w, neck_h = w * 0.45, h * 0.18
    body = [(x, y + neck_h / 2) for x, y in capsule_points(w, h - neck_h)]
    neck = rect_points(neck_w, neck_h, 0, -h / 2 + neck_h / 2)
    cap_color = jitter(rng, (40, 40, 40), 30) if rng.random() < 0.5 else item_color(rng)
    label = rect_points(w * 0.98, h * 0.25, 0, h * 0.1)
    return [(body, color), (neck, shade(color, 0.85)), (label, shade(color, 1.4)),
            (rect_points(neck_w * 1.1, neck_h * 0.5, 0, -h / 2 + neck_h * 0.25), cap_color)]


ITEM_BUILDERS = {"box": box_parts, "pouch": pouch_parts, "bottle": bottle_parts}


def place_items(rng, n: int, region: tuple[float, float, float, float], base: float):
    """Centres and sizes for n items: overlaps allowed but partial, so every item shows."""
    x0, y0, x1, y1 = region
    for attempt in range(60):
        scale = 0.93 ** (attempt // 10)  # crowded: try smaller items
        sizes = [base * scale * rng.uniform(0.8, 1.2) for _ in range(n)]
        placed: list[tuple[float, float, float]] = []
        for s in sizes:
            for _ in range(40):
                r = s * 0.6
                cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
                if all(math.hypot(cx - px, cy - py) >= OVERLAP * (r + pr) for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            return [(cx, cy, s) for (cx, cy, _), s in zip(placed, sizes)]
    raise RuntimeError("could not place items")  # not reached with the sizes used here


# ---------------------------------------------------------------------------------------------
# One photo


def draw_bin(draw: ImageDraw.ImageDraw, rng, w: int, h: int):
    """Back wall, four side walls in perspective: (back wall box, back wall colour)."""
    tone = jitter(rng, BIN_TONES[rng.integers(len(BIN_TONES))], 18)
    dx, dy = w * rng.uniform(0.07, 0.14), h * rng.uniform(0.08, 0.16)
    sx = w * rng.uniform(-0.04, 0.04)  # camera a little off-centre
    inner = (dx + sx, dy, w - dx + sx, h - dy * 0.6)
    ix0, iy0, ix1, iy1 = inner
    draw.rectangle((0, 0, w, h), fill=shade(tone, 0.95))
    walls = [
        ([(0, 0), (w, 0), (ix1, iy0), (ix0, iy0)], 1.1),       # top
        ([(0, 0), (ix0, iy0), (ix0, iy1), (0, h)], 0.75),      # left
        ([(w, 0), (w, h), (ix1, iy1), (ix1, iy0)], 0.85),      # right
        ([(0, h), (ix0, iy1), (ix1, iy1), (w, h)], 1.02),      # floor lip
    ]
    for poly, f in walls:
        draw.polygon(poly, fill=shade(tone, f * rng.uniform(0.95, 1.05)))
    wall = shade(tone, rng.uniform(0.8, 0.92))
    draw.rectangle(inner, fill=wall)
    edge = shade(tone, 0.6)
    for a, b in (((0, 0), (ix0, iy0)), ((w, 0), (ix1, iy0)), ((0, h), (ix0, iy1)), ((w, h), (ix1, iy1))):
        draw.line((a, b), fill=edge, width=max(1, w // 160))
    if rng.random() < 0.5:  # a bin label sticker on the front lip, like real ABID bins
        lw, lh = w * rng.uniform(0.15, 0.25), h * rng.uniform(0.05, 0.08)
        lx = rng.uniform(0.1, 0.9 - lw / w) * w
        top = rng.random() < 0.5
        ly = rng.uniform(0.005, 0.02) * h if top else h - lh - rng.uniform(0.005, 0.02) * h
        draw.rectangle((lx, ly, lx + lw, ly + lh), fill=(238, 238, 238))
        draw.rectangle((lx + lw * 0.7, ly + lh * 0.15, lx + lw * 0.92, ly + lh * 0.85), fill=(30, 30, 30))
    return inner, wall


def draw_items(draw: ImageDraw.ImageDraw, rng, n: int, inner, h: int, wall) -> list[dict]:
    ix0, iy0, ix1, iy1 = inner
    region = (ix0 - (ix1 - ix0) * 0.04, iy0 + (iy1 - iy0) * 0.05, ix1 + (ix1 - ix0) * 0.04, iy1 + h * 0.03)
    # The same item scale for every count (crowded bins shrink only if they must), so
    # the amount of 'stuff' in the bin grows with the count: a cue a small CNN can learn.
    base = h * rng.uniform(0.24, 0.3)
    items = []
    outline_w = max(1, round(h / 90))  # about 1.5 px after shrinking: edges survive 96 px
    for cx, cy, size in place_items(rng, n, region, base):
        kind = ITEM_KINDS[rng.integers(len(ITEM_KINDS))]
        color = item_color(rng, avoid=wall)
        angle = rng.uniform(-0.5, 0.5) + (math.pi / 2 if kind == "bottle" and rng.random() < 0.5 else 0)
        parts = ITEM_BUILDERS[kind](rng, size, color)
        outline = shade(color, 0.45)
        for i, (poly, fill) in enumerate(parts):
            pts = transform(poly, cx, cy, angle)
            draw.polygon(pts, fill=fill, outline=outline if i == 0 else None, width=outline_w)
        items.append({"kind": kind, "color": color, "size": size})
    return items


def draw_tape(img: Image.Image, rng) -> int:
    """0-3 translucent strips across the bin (straps and packing tape); they may cover items."""
    w, h = img.size
    n = int(rng.choice([0, 1, 1, 2, 2, 3]))
    if n == 0:
        return 0
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for _ in range(n):
        thick = h * rng.uniform(0.04, 0.13)
        y = rng.uniform(0.1, 0.9) * h
        tilt = h * rng.uniform(-0.08, 0.08)
        color = (jitter(rng, (235, 232, 220), 15) if rng.random() < 0.7
                 else jitter(rng, (190, 150, 95), 15))
        alpha = int(rng.uniform(60, 135))
        d.polygon([(0, y), (w, y + tilt), (w, y + tilt + thick), (0, y + thick)], fill=(*color, alpha))
        step = max(2, round(h / 64))  # the fine lines of elastic straps
        for k in range(0, int(thick), step * 2):
            d.line([(0, y + k), (w, y + tilt + k)], fill=(*shade(color, 0.9), min(255, alpha + 40)),
                   width=max(1, step // 2))
    img.alpha_composite(layer)
    return n


def finish(img: Image.Image, rng, size: tuple[int, int]) -> Image.Image:
    """Shrink to size, then uneven light, optional blur, sensor noise."""
    small = img.convert("RGB").resize(size, Image.Resampling.BOX)
    if rng.random() < 0.3:
        small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    a = np.asarray(small, dtype=np.float32)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta))
    light = rng.uniform(0.7, 1.15) + rng.uniform(0.0, 0.35) * ramp
    a = a * light[..., None] + rng.normal(0, rng.uniform(1.5, 6.0), a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def render(count: int, seed: int, index: int, size: tuple[int, int]) -> tuple[Image.Image, list[dict]]:
    """One synthetic bin photo with `count` items; a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = Image.new("RGBA", (w, h))
    draw = ImageDraw.Draw(img)
    inner, wall = draw_bin(draw, rng, w, h)
    items = draw_items(draw, rng, count, inner, h, wall)
    draw_tape(img, rng)
    for item in items:
        item["size"] /= SUPERSAMPLE
    return finish(img, rng, size), items


# ---------------------------------------------------------------------------------------------
# Metadata and the data set


def metadata(image_id: str, count: int, items: list[dict], seed: int, index: int) -> dict:
    """ABID-style metadata: one BIN_FCSKU_DATA entry per item, quantities summing to the count."""
    rng = np.random.default_rng([seed, index, 1])
    skus = {}
    for item in items:
        asin = "S" + "".join(rng.choice(list("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"), 9))
        r, g, b = item["color"]
        name = f"Synthetic {item['kind']} #{r:02X}{g:02X}{b:02X}"
        dims = sorted(round(float(item["size"] * rng.uniform(0.04, 0.08)), 2) for _ in range(3))
        skus[asin] = {
            "asin": asin,
            "name": name,
            "normalizedName": name.lower(),
            "quantity": 1,
            "height": {"unit": "IN", "value": dims[0]},
            "width": {"unit": "IN", "value": dims[1]},
            "length": {"unit": "IN", "value": dims[2]},
            "weight": {"unit": "pounds", "value": round(float(rng.uniform(0.1, 3.0)), 2)},
        }
    return {"BIN_FCSKU_DATA": skus, "EXPECTED_QUANTITY": count, "image_fname": f"{image_id}.jpg"}


def labels(per_class: int, seed: int) -> list[int]:
    """Counts for image indices 0..N-1: balanced, in a seeded order (ids do not give it away)."""
    counts = np.repeat(np.array(CLASSES), per_class)
    return [int(c) for c in np.random.default_rng([seed, 2**31]).permutation(counts)]


def write_one(job: tuple[Path, int, int, int, tuple[int, int]]) -> None:
    out, index, count, seed, size = job
    image_id = f"{index + 1:05d}"
    img, items = render(count, seed, index, size)
    img.save(out / "bin-images" / f"{image_id}.jpg", "JPEG", quality=JPEG_QUALITY)
    meta = metadata(image_id, count, items, seed, index)
    (out / "metadata" / f"{image_id}.json").write_text(json.dumps(meta, indent=1) + "\n")


def prepare(out: Path) -> None:
    """Start from an empty set; refuse to overwrite image folders this module did not write."""
    images = out / "bin-images"
    if images.exists() and any(images.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} already holds bin-images/ not written by pipeline.data.synth; "
                              "choose an empty folder")
    for name in ("bin-images", "metadata"):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).mkdir(parents=True)


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def write_dataset(out: Path, per_class: int = 300, seed: int = 0, size: tuple[int, int] = (160, 128),
                  workers: int | None = None) -> dict:
    """Write per_class photos of each count 1-5 in ABID bucket layout; returns a summary."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    start = time.perf_counter()
    out = Path(out)
    prepare(out)
    jobs = [(out, i, c, seed, tuple(size)) for i, c in enumerate(labels(per_class, seed))]
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(jobs) < 50:
        for job in jobs:
            write_one(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    summary = {
        "path": str(out),
        "images": len(jobs),
        "counts": {str(c): per_class for c in CLASSES},
        "seed": seed,
        "size": list(size),
        "layout": "abid-bucket",
    }
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.synth",
                                description="Write synthetic bin photos in ABID bucket layout.")
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    try:
        s = write_dataset(args.out, args.per_class, args.seed, workers=args.workers)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['images']} synthetic bin photos ({args.per_class} per count 1-5, "
          f"seed {args.seed}) to {s['path']} in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
