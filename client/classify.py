"""Files in, slice and series scores out, through any :class:`Classifier`.

The same code drives in-process PyTorch (``--local``) and Triton (``--url``):
a classifier only has to turn a uint8 (N, 3, S, S) model input batch
(:func:`client.preprocess.model_input`) into N probabilities of hemorrhage,
and run the model's series model where its series rule asks for it.
Bad files become failed rows with their reason; they never stop the rest of
the run.

    classifier = LocalClassifier(get_model("mobilenet_v2"))
    results = classify_files(find_image_files([Path("study/")]), classifier)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from client.constants import PRIORITY_ROUTINE
from client.decode import decode_file
from client.errors import HemoTriageError
from client.preprocess import head_fraction, model_input, model_view, normalize
from client.registry import ModelSpec
from client.series import SeriesDecision, decide_series

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}


class Classifier(Protocol):
    """Anything that scores a preprocessed batch: in-process torch, ONNX Runtime, Triton."""

    spec: ModelSpec

    def predict(self, batch: np.ndarray, priority: int = PRIORITY_ROUTINE) -> np.ndarray:
        """Score a uint8 (N, 3, S, S) model input batch; return N probabilities of hemorrhage."""
        ...

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """Run the model's series model (:class:`client.series.SeriesRefiner`)."""
        ...


class LocalSeriesModel:
    """The model's series model in-process, on its committed weights (no server needed)."""

    def __init__(self, spec: ModelSpec) -> None:
        from client.torch_models import load_series_model  # torch stays optional for the console

        self._model = load_series_model(spec)

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """(T, F) series features to (T,) refined slice probabilities and P(series)."""
        import torch

        with torch.inference_mode():
            slices, series = self._model(torch.from_numpy(np.asarray(features, np.float32))[None])
        return slices[0].numpy(), float(series[0])


class LocalClassifier:
    """In-process PyTorch inference on the committed weights (no server needed).

    Takes the same uint8 model input as Triton and normalizes it with
    :func:`client.preprocess.normalize`, the one definition.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu") -> None:
        from client.torch_models import load_model  # torch stays optional for the console

        self.spec = spec
        self._device = device
        self._model = load_model(spec, device)
        self._series_model: LocalSeriesModel | None = None

    def predict(self, batch: np.ndarray, priority: int = PRIORITY_ROUTINE) -> np.ndarray:
        """Score a batch; ``priority`` is accepted for interface parity and unused here."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(normalize(batch, self.spec)).to(self._device)
            logits = self._model(x)
            return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()

    def refine_series(self, features: np.ndarray) -> tuple[np.ndarray, float]:
        """The series model's refined slice probabilities and P(series), loaded on first use."""
        if self._series_model is None:
            self._series_model = LocalSeriesModel(self.spec)
        return self._series_model.refine_series(features)


@dataclass(frozen=True)
class SliceResult:
    """One file's outcome: a probability, or the reason it could not be scored."""

    path: Path
    probability: float | None
    head_fraction: float
    order_key: tuple
    error: str | None = None


@dataclass(frozen=True)
class SeriesResult:
    """One folder scored as one series."""

    folder: Path
    series: SeriesDecision | None
    key_slice: Path | None
    slices: list[SliceResult]


def find_image_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders (recursively) into candidate image files, in natural order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"), key=_natural_key)
                if p.is_file()
                and not p.name.startswith(".")
                and p.suffix.lower() in _IMAGE_SUFFIXES
            )
        else:
            found.append(path)
    return found


def classify_files(
    files: Sequence[Path], classifier: Classifier, batch_size: int = 16
) -> list[SliceResult]:
    """Decode, preprocess and score files in batches; failures become rows with a reason."""
    results: list[SliceResult] = []
    pending: list[tuple[Path, np.ndarray, float, tuple]] = []

    def flush() -> None:
        if not pending:
            return
        probabilities = classifier.predict(np.stack([t for _, t, _, _ in pending]))
        results.extend(
            SliceResult(path, float(p), head, key)
            for (path, _, head, key), p in zip(pending, probabilities, strict=True)
        )
        pending.clear()

    for path in files:
        try:
            image = decode_file(path)
            view = model_view(image, classifier.spec)
        except (HemoTriageError, OSError) as e:
            logger.warning("rejected %s: %s", path.name, e)
            results.append(SliceResult(path, None, 0.0, _natural_key(path), error=str(e)))
            continue
        key = _order_key(path, image.dicom)
        pending.append((path, model_input(view), head_fraction(view), key))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def classify_series(folder: Path, classifier: Classifier, batch_size: int = 16) -> SeriesResult:
    """Score every slice of a folder and decide the series as the console does."""
    slices = classify_files(find_image_files([folder]), classifier, batch_size)
    scored = sorted((s for s in slices if s.probability is not None), key=lambda s: s.order_key)
    if not scored:
        return SeriesResult(folder, None, None, slices)
    decision = decide_series(
        classifier.spec,
        [s.probability for s in scored],
        [s.head_fraction for s in scored],
        classifier,
    )
    return SeriesResult(folder, decision, scored[decision.key_index].path, slices)


def _order_key(path: Path, dicom) -> tuple:
    """Anatomical order: DICOM slice position, then instance number, then file name."""
    if dicom is not None and dicom.slice_position_mm is not None:
        return (0, dicom.slice_position_mm)
    if dicom is not None and dicom.instance_number is not None:
        return (1, dicom.instance_number)
    return (2, *_natural_key(path))


def _natural_key(path: Path) -> tuple:
    """Sort 'slice_2' before 'slice_10'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path)))
