"""The photos and shifts of the drift benchmarks (drift_detection.py, drift_libraries.py).

Each shift is what a warehouse could do to its photos without telling anyone: dim the lights,
mount a camera that blurs or sits closer, change what the bins hold, or (by mistake) feed the
endpoint synthetic bins. Low light and blur are Evaluate's own corruptions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHIFTS = ("low_light", "blur", "camera", "fill_level", "synthetic")
PIXEL_SHIFTS = ("low_light", "blur", "camera")  # made from each held-out photo


def labelled_photos(folder: Path) -> list[tuple[Path, int]]:
    """(photo, count) of a folder with one subfolder per count, or in the ABID bucket layout."""
    found = []
    for count in range(1, 6):
        found += [(p, count) for p in sorted((folder / str(count)).glob("*.jpg"))]
    if not found:  # the ABID bucket layout (pipeline.data.synth writes it)
        for meta in sorted((folder / "metadata").glob("*.json")):
            found.append((folder / "bin-images" / f"{meta.stem}.jpg", json.loads(meta.read_text())["EXPECTED_QUANTITY"]))
    return found


def shifted(image, kind: str):
    """A PIL image as the shift would have photographed it."""
    from PIL import Image, ImageFilter  # here: drift_libraries.py's compare stage runs without Pillow

    image = image.convert("RGB")
    if kind == "low_light":  # Evaluate's low-light corruption (brightness 0.35, gamma 1.5)
        pixels = 0.35 * (np.asarray(image, np.float32) / 255.0) ** 1.5
        return Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8))
    if kind == "blur":  # Evaluate's blur: sigma 1.5% of the short side
        return image.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.015 * min(image.size))))
    if kind == "camera":  # a closer camera: the centre 75%, scaled back to the photo's size
        w, h = image.size
        box = (round(w * 0.125), round(h * 0.125), round(w * 0.875), round(h * 0.875))
        return image.crop(box).resize((w, h), Image.BICUBIC)
    raise ValueError(f"not a pixel shift: {kind}")
