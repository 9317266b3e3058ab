"""Bulk counting: `invmon predict DIR_OR_GLOB --out counts.csv`.

Thousands of photos, counted in batches (local model: decoding in threads while predict_fn
scores the previous batch; a running endpoint: several requests in flight). Every photo gets
one CSV row: id, path, count, confidence, one probability column per class, error. A photo
that cannot be read or decoded is a row with its error, never an abort.

A SageMaker Batch Transform job (pipeline/sagemaker/transform.py) answers each photo with what the
artifact's output_fn wrote (its `<key>.out`) or refuses it with the artifact's error: `answer_row`
turns either into the same Row, and `write_csv` writes both kinds of run.
"""
from __future__ import annotations

import csv
import glob
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping

import httpx


PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


class NoPhotos(ValueError):
    """An argument names no photo (no such file, empty folder, a glob matching nothing)."""


def collect_photos(items: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for .jpg/.jpeg/.png; anything else a glob."""
    photos: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            photos.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise NoPhotos(f"no .jpg/.jpeg/.png photos under {path}")
            photos += found
        else:
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise NoPhotos(f"no such photo, folder or matching glob: {item}")
            photos += found
    return photos


@dataclass
class Row:
    path: Path | str  # a local file, or an s3:// URI (Batch Transform)
    answer: dict | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        return PurePosixPath(str(self.path)).stem


def answer_row(path: Path | str, body: bytes | str | None, refusal: str | None = None) -> Row:
    """A photo's row from what the artifact answered for it: the text its output_fn wrote (JSON
    with count and probabilities, or `{"error": ...}` as output_fn writes an error under the
    serving toolkit), or the message it was refused with. No answer at all is an error row."""
    if refusal is not None:
        return Row(path, error=refusal)
    if body is None:
        return Row(path, error="no answer for this photo in the job's output")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return Row(path, error=f"the answer is not JSON ({exc})")
    if isinstance(answer, dict) and "error" in answer:
        return Row(path, error=str(answer["error"]))
    probabilities = answer.get("probabilities") if isinstance(answer, dict) else None
    if (not isinstance(probabilities, dict) or not probabilities
            or str(answer.get("count")) not in probabilities
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in probabilities.values())):
        return Row(path, error="the answer has no count with its probabilities")
    return Row(path, answer=answer)


def rows_from_answers(answers: Iterable[tuple[Path | str, bytes | str | None]],
                      refusals: Mapping[str, str] | None = None) -> Iterator[Row]:
    """Rows from (photo, the text answered for it or None) pairs, in their order; a photo's
    refusal (keyed by str(photo)) is its row, whatever was answered."""
    refusals = refusals or {}
    for path, body in answers:
        yield answer_row(path, body, refusals.get(str(path)))


@dataclass
class Tally:
    photos: int = 0
    counted: int = 0
    errors: int = 0
    seconds: float = 0.0
    by_error: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.photos / self.seconds if self.seconds else 0.0


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(text: str | None) -> str:
    """A file name or message as a CSV cell a spreadsheet shows as text: a photo named
    `=HYPERLINK(...).jpg` (anyone who can write to the bucket can name one) must not become a
    formula in the reviewer's spreadsheet, so such a cell starts with a quote (OWASP's advice)."""
    text = text or ""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class CsvOut:
    """Writes rows as they come. The class columns come from the first answer, so rows before
    it (errors only) wait in memory until then."""

    def __init__(self, handle):
        self.writer = csv.writer(handle)
        self.labels: list[str] | None = None
        self.waiting: list[Row] = []

    def _line(self, row: Row) -> list:
        if row.answer is None:
            return [text_cell(row.id), text_cell(str(row.path)), "", "", *[""] * len(self.labels),
                    text_cell(row.error)]
        probs = row.answer["probabilities"]
        count = row.answer["count"]
        return [text_cell(row.id), text_cell(str(row.path)), count, f"{probs[str(count)]:.6f}",
                *[f"{probs[label]:.6f}" for label in self.labels], ""]

    def write(self, row: Row) -> None:
        if self.labels is None:
            if row.answer is None:
                self.waiting.append(row)
                return
            self.labels = list(row.answer["probabilities"])
            self.writer.writerow(["id", "path", "count", "confidence",
                                  *[f"p{label}" for label in self.labels], "error"])
            for waiting in self.waiting:
                self.writer.writerow(self._line(waiting))
            self.waiting = []
        self.writer.writerow(self._line(row))

    def close(self) -> None:
        if self.labels is None:  # nothing was counted: the errors still get their rows
            self.labels = []
            self.writer.writerow(["id", "path", "count", "confidence", "error"])
            for waiting in self.waiting:
                self.writer.writerow(self._line(waiting))


def decode_photo(model, photo: Path):
    """(image, None) or (None, the reason it cannot be counted)."""
    from pipeline.serving.endpoint import RequestError, content_type_for

    try:
        body = photo.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    try:
        return model.decode(body, content_type_for(photo)), None
    except RequestError as exc:
        return None, exc.message


def count_local(model, photos: list[Path], batch_size: int = 16, workers: int = 2) -> Iterator[Row]:
    """Rows in photo order. Decoding runs in `workers` threads one batch ahead of predict_fn,
    so at most two batches of decoded photos are held at once."""
    batches = [photos[i:i + batch_size] for i in range(0, len(photos), batch_size)]
    with ThreadPoolExecutor(workers, thread_name_prefix="invmon-decode") as pool:
        ahead: deque = deque()
        for index in range(len(batches)):
            while len(ahead) < 2 and index + len(ahead) < len(batches):
                ahead.append([(p, pool.submit(decode_photo, model, p))
                              for p in batches[index + len(ahead)]])
            decoded = [(p, *f.result()) for p, f in ahead.popleft()]
            good = [(p, image) for p, image, error in decoded if error is None]
            answers = {}
            if good:
                try:
                    answers = dict(zip([p for p, _ in good],
                                       model.predict_batch([image for _, image in good])))
                except Exception as exc:  # noqa: BLE001 - the batch's rows carry the error
                    answers = {p: exc for p, _ in good}
            for p, _, error in decoded:
                answer = answers.get(p)
                if isinstance(answer, Exception):
                    yield Row(p, error=f"prediction failed: {type(answer).__name__}: {answer}")
                else:
                    yield Row(p, answer=answer, error=error)


def count_remote(url: str, photos: list[Path], concurrency: int = 8, timeout: float = 60.0,
                 retries: int = 5) -> Iterator[Row]:
    """Rows in photo order from a running endpoint; a 503 is retried after its Retry-After."""
    from pipeline.serving.endpoint import JSON, content_type_for

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/invocations"):
        endpoint += "/invocations"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout, limits=limits) as client:
        def one(photo: Path) -> Row:
            try:
                body = photo.read_bytes()
            except OSError as exc:
                return Row(photo, error=f"cannot read: {exc.strerror or exc}")
            for attempt in range(retries + 1):
                try:
                    response = client.post(endpoint, content=body, headers={
                        "Content-Type": content_type_for(photo), "Accept": JSON})
                except httpx.HTTPError as exc:
                    return Row(photo, error=f"cannot reach {endpoint}: {exc}")
                if response.status_code == 503 and attempt < retries:
                    time.sleep(float(response.headers.get("retry-after", "1") or 1))
                    continue
                break
            if response.status_code == 200:
                return Row(photo, answer=response.json())
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            return Row(photo, error=f"HTTP {response.status_code}: {message}")

        with ThreadPoolExecutor(concurrency, thread_name_prefix="invmon-client") as pool:
            yield from pool.map(one, photos)


def write_csv(rows: Iterable[Row], out: Path, total: int, progress: bool = True) -> Tally:
    from tqdm import tqdm

    tally = Tally(photos=total)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle, \
            tqdm(total=total, unit="photo", disable=not progress, dynamic_ncols=True) as bar:
        sink = CsvOut(handle)
        for row in rows:
            sink.write(row)
            if row.error is None:
                tally.counted += 1
            else:
                tally.errors += 1
                kind = row.error.split(":")[0][:60]
                tally.by_error[kind] = tally.by_error.get(kind, 0) + 1
            bar.update(1)
        sink.close()
    tally.seconds = time.perf_counter() - started
    return tally


def raw_forward_rate(model, images: list, batch_size: int, seconds: float = 3.0) -> float:
    """Images/s of the bare forward pass of `model` (a LoadedModel) on preloaded, already
    resized and normalised tensors at `batch_size`: the ceiling serving is measured against."""
    done, elapsed, _ = raw_forward(model, images, batch_size, seconds)
    return done / elapsed


def raw_forward(model, images: list, batch_size: int, seconds: float) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds of this process) of the bare forward pass at `batch_size`,
    run for at least `seconds` and 3 batches. Uses the artifact's own to_tensor and model when it
    exposes them (this project's inference.py does), else predict_fn on preloaded images."""
    import torch

    inference, loaded = model.inference, model.model
    batch_images = (images * (batch_size // max(len(images), 1) + 1))[:batch_size]
    if isinstance(loaded, dict) and "model" in loaded and hasattr(inference, "to_tensor"):
        net, device = loaded["model"], loaded.get("device", "cpu")
        batch = torch.stack([inference.to_tensor(i, loaded["config"]) for i in batch_images]).to(device)

        def step():
            with torch.inference_mode():
                net(batch)
    else:
        def step():
            inference.predict_fn(list(batch_images), loaded)
    step()  # warm-up: first-call allocations are not throughput
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or done < 3:
        step()
        done += 1
    return done * batch_size, time.perf_counter() - started, time.process_time() - cpu


def summary_line(tally: Tally) -> str:
    errors = f", {tally.errors} errors ({json.dumps(tally.by_error)})" if tally.errors else ""
    return (f"{tally.photos} photos in {tally.seconds:.1f} s: {tally.rate:.1f} photos/s "
            f"({tally.counted} counted{errors})")
