"""Preprocess: validate, resize and split ABID photos into train/validation/test + a data report."""
from steps.base import (PROCESSING_BASE, Code, Param, ProcessingInput, ProcessingOutput,
                        ProcessingStep, S3Selection)

DATA = f"{PROCESSING_BASE}/input/data"
MANIFEST = f"{PROCESSING_BASE}/input/manifest"
OUTPUT = f"{PROCESSING_BASE}/output"
SPLITS = ("train", "validation", "test")

SELECTION = S3Selection(manifest=Param("ManifestUrl"), counts=Param("SelectCounts"),
                        per_count=Param("PerCount"), seed=Param("Seed"))

STEP = ProcessingStep(
    name="Preprocess",
    description="Validate every photo, resize, split 60/20/20 stratified by count, report.",
    code=Code("preprocess", "preprocess.py", extra_files=("inference/photos.py",)),
    inputs=(
        # Real ABID is read object by object, never mounted (see S3Selection).
        ProcessingInput("data", Param("InputDataUrl"), DATA, s3_selection=SELECTION),
        ProcessingInput("manifest", Param("ManifestUrl"), MANIFEST, optional=True),
    ),
    outputs=tuple(ProcessingOutput(name, f"{OUTPUT}/{name}") for name in (*SPLITS, "report")),
    arguments=(
        "--input", DATA,
        "--manifest", MANIFEST,
        "--output", OUTPUT,
        "--resize", Param("ResizeShortSide"),
        # The model's side: the monitoring baseline's image statistics are measured there, on
        # every photo as received (report/image_statistics.json).
        "--statistics-side", Param("ImageSize"),
        "--seed", Param("Seed"),
        "--counts", Param("SelectCounts"),
        "--per-count", Param("PerCount"),
        "--shard", "auto",  # one disjoint shard per processing instance
    ),
    cache=True,
)
