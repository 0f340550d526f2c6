"""``covidct predict``: probability and label for PNG, JPEG or DICOM files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from classifier.errors import UnusableInputError
from classifier.inference import Classifier
from classifier.preprocess import dicom_inputs, is_dicom, read_dicom, to_model_input


@dataclass
class PredictionLine:
    name: str
    probability: float | None = None
    label: str = ""
    error: str | None = None

    def format(self) -> str:
        if self.error is not None:
            return f"{self.name}\terror: {self.error}"
        return f"{self.name}\t{self.probability:.4f}\t{self.label}"


def predict_files(files: list[Path], model_path: Path) -> Iterator[PredictionLine]:
    clf = Classifier(model_path)
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield PredictionLine(str(path), error=exc.strerror or str(exc))
            continue
        try:
            if is_dicom(data):
                ds = read_dicom(data)
                frames = list(dicom_inputs(ds))
                for f in frames:
                    name = str(path) if len(frames) == 1 else f"{path}[{f.frame + 1}]"
                    if f.array is None:
                        yield PredictionLine(name, error=f"skipped: {f.skipped}")
                        continue
                    (p,) = clf.predict(f.array[None])
                    yield PredictionLine(name, p.probability, p.label)
            else:
                (p,) = clf.predict(to_model_input(data)[None])
                yield PredictionLine(str(path), p.probability, p.label)
        except UnusableInputError as exc:
            yield PredictionLine(str(path), error=str(exc))
