"""Small, fixed samples of the labelled slices for parity, calibration and evaluation.

Export parity, INT8 calibration and the INT8-vs-fp32 comparison all need a few
hundred real slices, preprocessed exactly as in training (through
:func:`build_engines.data.load_view` and :func:`client.preprocess.model_input`),
read in place from the data folder. Patients are split in two halves by a hash
of their key, so the calibration slices never overlap the evaluation slices.

    batch, labels = labelled_sample(get_model("resnet18"), 64, part="evaluation")
    batch.shape, batch.dtype   # (64, 3, 224, 224) uint8, the model input
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Literal

import numpy as np

from build_engines.data import SliceRecord, data_dir_from_env, index_records, load_view
from client.preprocess import model_input
from client.registry import ModelSpec

Part = Literal["calibration", "evaluation", "any"]


def sample_records(
    n: int, part: Part = "any", seed: int = 0, data_dir: Path | None = None
) -> list[SliceRecord]:
    """Pick ``n`` labelled slices, stratified by label, from one half of the patients.

    Args:
        n: Number of slices (half positive, half negative where possible).
        part: ``calibration`` or ``evaluation`` half of the patients, or ``any``.
        seed: Seed of the shuffle; the same seed gives the same slices.
        data_dir: Data folder; ``HEMOTRIAGE_DATA_DIR`` or ../shared/data by default.

    Returns:
        The chosen records, in a fixed order.
    """
    records = [
        r
        for r in index_records(data_dir or data_dir_from_env())
        if part == "any" or _patient_half(r.patient) == part
    ]
    rng = random.Random(seed)
    positives = [r for r in records if r.label == 1]
    negatives = [r for r in records if r.label == 0]
    rng.shuffle(positives)
    rng.shuffle(negatives)
    n_pos = min(len(positives), n // 2)
    chosen = positives[:n_pos] + negatives[: n - n_pos]
    rng.shuffle(chosen)
    return chosen


def load_views(records: list[SliceRecord], spec: ModelSpec) -> np.ndarray:
    """Records through the training preprocessing, as float32 (N, 1, S, S) views in [0, 1]."""
    return np.stack([load_view(r, spec) for r in records])[:, None]


def load_batch(records: list[SliceRecord], spec: ModelSpec) -> np.ndarray:
    """Records through the training preprocessing, as the uint8 (N, 3, S, S) model input."""
    return model_input(load_views(records, spec))


def labelled_sample(
    spec: ModelSpec, n: int, part: Part = "any", seed: int = 0, data_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed batch and its labels; see :func:`sample_records`.

    Returns:
        ``(batch, labels)``: uint8 (N, 3, S, S) and int64 (N,).
    """
    records = sample_records(n, part, seed, data_dir)
    labels = np.array([r.label for r in records], dtype=np.int64)
    return load_batch(records, spec), labels


def _patient_half(patient: str) -> Part:
    digest = hashlib.sha1(patient.encode()).digest()
    return "calibration" if digest[0] % 2 == 0 else "evaluation"
