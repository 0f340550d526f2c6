"""A study's files become a verdict, without the results store or the network.

    select slices -> read + preprocess (streamed; each frame also kept as a small HU grid)
          -> classify in batches -> segment and measure the lungs (in a thread, once every
          file is read) -> aggregate the CNN over slices inside the lungs -> verdict

The worker (:mod:`worker.pipeline`) and ``covidct evaluate-studies`` both run :func:`analyse`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import pydicom

from classifier.aggregate import study_probability, study_verdict
from classifier.errors import UnusableInputError
from classifier.inference import Classifier
from classifier.lungs import NoLungs
from classifier.preprocess import DEFAULT_FRAMING, frame_and_grid
from core.settings import Settings
from worker.lungs import LungResult, measure_lungs
from worker.prefetch import prefetch
from worker.selection import Selection, SliceRef
from worker.selection import select as select_slices


@dataclass
class Timings:
    read: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    lungs: float = 0.0
    sr: float = 0.0
    total: float = 0.0
    slices: int = 0
    extra: dict[str, float] = field(default_factory=dict)


Item = tuple[SliceRef, np.ndarray | str, np.ndarray | None]
# how the reason of a slice whose pixels could not be decoded starts: the file, or its frame
UNREADABLE, UNUSABLE = "unreadable: ", "unusable: "


@dataclass
class _Read:
    """One file read and preprocessed, per frame: (slice, model input or why it was
    skipped, the frame's HU grid for the lung segmentation or None if it was unreadable)."""

    items: list[Item]
    read: float
    preprocess: float


def _read_file(refs: list[SliceRef], header: pydicom.Dataset) -> _Read:
    """Decode and preprocess the frames the selection kept of one file, from the header
    the selection already parsed (its pixel data deferred), then drop the pixel data again
    so that the header kept for the SR stays small.  A file that vanished or cannot be read
    skips its slices."""
    t0 = time.perf_counter()
    try:
        header.PixelData  # noqa: B018 - reads the deferred value: the file I/O of this slice
    except Exception as exc:  # unreadable or vanished file in the spool: skip its slices
        return _Read(
            [(ref, f"{UNREADABLE}{exc}", None) for ref in refs], time.perf_counter() - t0, 0.0
        )
    t1 = time.perf_counter()
    items: list[Item] = []
    try:
        for ref in refs:
            try:
                done = frame_and_grid(header, ref.frame, DEFAULT_FRAMING)
                items.append((ref, done.item, done.hu_grid))
            except UnusableInputError as exc:
                items.append((ref, f"{UNUSABLE}{exc}", None))
    finally:
        del header.PixelData
    return _Read(items, t1 - t0, time.perf_counter() - t1)


def read_ahead(
    slices: list[SliceRef],
    headers: dict[int, pydicom.Dataset],
    t: Timings,
    *,
    threads: int = 1,
    depth: int = 64,
    grids: dict[SliceRef, np.ndarray] | None = None,
    all_read: threading.Event | None = None,
) -> Iterator[Item]:
    """Read and preprocess, in order, on ``threads`` threads while the model runs on the
    previous batch: file I/O, NumPy, Pillow and TensorFlow release the GIL (the JPEG decoders,
    GDCM and pylibjpeg, measured do not: two threads decode no faster than one).  At most
    ``depth`` files are in flight, so memory stays flat whatever the study size.  Frames of
    one multi-frame file are read together, once.

    ``grids`` is filled with each frame's HU grid as soon as its file is read, and
    ``all_read`` set once every file is: the lungs can be segmented while the model still
    works through the last ``depth`` files."""
    groups = [list(g) for _, g in groupby(slices, key=lambda ref: ref.path)]
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read-ahead")
    lock = threading.Lock()
    remaining = [len(groups)]

    def read(group: list[SliceRef]) -> _Read:
        done = _read_file(group, headers[group[0].instance_id])
        if grids is not None:
            grids.update((ref, g) for ref, _, g in done.items if g is not None)
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0 and all_read is not None:
                all_read.set()
        return done

    if not groups and all_read is not None:
        all_read.set()
    try:
        pending: deque[Future[_Read]] = deque(pool.submit(read, g) for g in groups[:depth])
        following = iter(groups[depth:])
        while pending:
            done = pending.popleft().result()
            t.read += done.read
            t.preprocess += done.preprocess
            if (group := next(following, None)) is not None:
                pending.append(pool.submit(read, group))
            yield from done.items
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Analysis:
    """What the serving path concludes from a study's files, before anything is stored.
    ``reason`` set: not analysable, and why."""

    selection: Selection
    timings: Timings
    reason: str = ""
    analysed: list[SliceRef] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    skipped: list[tuple[SliceRef, str]] = field(default_factory=list)
    probability: float | None = None
    top: list[int] = field(default_factory=list)
    verdict: str | None = None
    basis: str = ""
    lungs: LungResult | None = None

    def slices_unreadable(self) -> int:
        """Slices of the series read whose pixels could not be decoded: neither scored nor
        measured."""
        return sum(why.startswith((UNREADABLE, UNUSABLE)) for _, why in self.skipped)


def analyse(
    instances: list[tuple[int, str]],
    settings: Settings,
    classifier: Classifier,
    on_batch: Callable[[], None] = lambda: None,
) -> Analysis:
    """Selection, read and preprocessing, inference, lung segmentation and quantification,
    aggregation and the verdict for ``(id, path)`` pairs: the whole serving path without the
    results store or the network (``covidct evaluate-studies`` runs exactly this)."""
    t = Timings()
    t0 = time.perf_counter()
    prefetch(path for _, path in instances)
    selection = select_slices(instances, settings.min_series_slices)
    t.read += time.perf_counter() - t0
    out = Analysis(selection, t)
    if not selection.slices:
        out.reason = selection.reason()
        return out
    batch_refs: list[SliceRef] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        t1 = time.perf_counter()
        out.probs.extend(float(p) for p in classifier.probabilities(np.stack(batch)))
        t.inference += time.perf_counter() - t1
        out.analysed.extend(batch_refs)
        batch.clear()
        batch_refs.clear()
        on_batch()

    grids: dict[SliceRef, np.ndarray] = {}
    all_read, abandoned = threading.Event(), threading.Event()
    lungs_thread = ThreadPoolExecutor(1, thread_name_prefix="lungs")

    def measure() -> tuple[LungResult, float]:
        # scipy.ndimage releases the GIL: this overlaps the model's last batches
        all_read.wait()
        if abandoned.is_set():
            raise NoLungs("the analysis stopped before every slice was read")
        t1 = time.perf_counter()
        return measure_lungs(grids, selection.headers), time.perf_counter() - t1

    lungs_future = lungs_thread.submit(measure)
    try:
        for ref, item, _ in read_ahead(
            selection.slices,
            selection.headers,
            t,
            threads=settings.read_threads,
            grids=grids,
            all_read=all_read,
        ):
            if isinstance(item, str):
                out.skipped.append((ref, item))
                continue
            batch.append(item)
            batch_refs.append(ref)
            if len(batch) == settings.batch_size:
                flush()
        if batch:
            flush()
        t.slices = len(out.analysed)
        t1 = time.perf_counter()
        try:
            out.lungs, t.lungs = lungs_future.result()
        except NoLungs as exc:
            out.reason = f"no lungs to analyse: {exc}"
        t.extra["lungs_wait"] = time.perf_counter() - t1
    finally:
        if not lungs_future.done():  # the loop failed: do not segment half a series
            abandoned.set()
            all_read.set()
        lungs_thread.shutdown(wait=True)
    if not out.analysed:
        out.reason = "no slice shows enough lung: " + (out.skipped[0][1] if out.skipped else "")
        return out
    if out.lungs is None:
        return out
    lungs = out.lungs
    # the CNN's evidence comes from slices inside the segmented lungs only: a slice framed on
    # stomach or bowel gas, or on the trachea above the apices, is not lung.  Lungs that fail
    # the gate cannot say which slices those are: every slice the 2D framing kept counts.
    kept = [
        i
        for i, ref in enumerate(out.analysed)
        if not lungs.quantification.lungs_ok or lungs.lung_fraction(ref) != 0.0
    ]
    if not kept:
        out.reason = "no analysed slice lies inside the segmented lungs"
        return out
    if len(kept) < len(out.analysed):
        outside = sorted(set(range(len(out.analysed))) - set(kept))
        out.skipped.extend((out.analysed[i], "no lung in the 3D segmentation") for i in outside)
        out.analysed = [out.analysed[i] for i in kept]
        out.probs = [out.probs[i] for i in kept]
    out.probability, out.top = study_probability(out.probs)
    out.verdict, out.basis = study_verdict(
        out.probability, classifier.threshold, settings.indeterminate_band, lungs.quantification
    )
    t.slices = len(out.analysed)
    return out
