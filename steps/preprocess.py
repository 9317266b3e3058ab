"""Preprocess: validate, resize and split ABID photos into train/validation/test + a data report."""
from steps.base import (PROCESSING_BASE, Code, Param, ProcessingInput, ProcessingOutput,
                        ProcessingStep)

DATA = f"{PROCESSING_BASE}/input/data"
MANIFEST = f"{PROCESSING_BASE}/input/manifest"
OUTPUT = f"{PROCESSING_BASE}/output"
SPLITS = ("train", "validation", "test")

STEP = ProcessingStep(
    name="Preprocess",
    description="Validate every photo, resize, split 60/20/20 stratified by count, report.",
    code=Code("preprocess", "preprocess.py", extra_files=("inference/photos.py",)),
    inputs=(
        ProcessingInput("data", Param("InputDataUrl"), DATA),
        ProcessingInput("manifest", Param("ManifestUrl"), MANIFEST, optional=True),
    ),
    outputs=tuple(ProcessingOutput(name, f"{OUTPUT}/{name}") for name in (*SPLITS, "report")),
    arguments=(
        "--input", DATA,
        "--manifest", MANIFEST,
        "--output", OUTPUT,
        "--resize", Param("ResizeShortSide"),
        "--seed", Param("Seed"),
    ),
    cache=True,
)
