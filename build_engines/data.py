"""The labelled slices in ../shared/data, indexed by patient, cached as model views.

Three sources, read in place (see ../shared/data/README.md): ``kaggle_head_ct``
(one publication-style slice per patient), ``phe_sich`` (spontaneous ICH
series, rotated face-left, so turned to face-up here) and ``ct_ich_dev``
(trauma series, every slice). Each slice goes once through the client's
preprocessing path and is cached as uint8, so training never re-decodes.

    dataset = load_dataset(data_dir)             # preprocessed, cached
    dataset.views.shape                          # (n, 224, 224) uint8
    dataset.inputs(idx, "2.5d").shape            # (len(idx), 3, 224, 224): previous, slice, next
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.constants import DEFAULT_DATA_DIR, ENV_PREFIX, REPO_ROOT
from client.decode import DecodedImage, decode_file
from client.preprocess import head_fraction, model_view
from client.registry import PREPROCESSING_VERSION, ModelSpec

logger = logging.getLogger(__name__)

SOURCES = ("kaggle_head_ct", "phe_sich", "ct_ich_dev")
#: phe_sich slices with less content than this are blank frames (README: drop them).
_MIN_CONTENT_FRAC = 0.05
#: What a slice model sees: the slice alone (repeated to three channels), or the
#: slice between its series neighbours, one per channel (2.5D).
CONTEXTS = ("2d", "2.5d")
#: What a model sees around the skull: ``keep`` the whole head (served models),
#: ``strip`` only what lies inside the skull (:func:`client.preprocess.model_view`).
SCALPS = ("keep", "strip")
#: What training draws equally often inside a (source, label) cell: each slice
#: (served models), or each patient, however many slices it has in the cell.
SAMPLINGS = ("slice", "patient")


@dataclass(frozen=True)
class SliceRecord:
    """One labelled slice."""

    source: str
    path: Path
    patient: str  # unique across sources: "<source>/<id>"
    label: int  # 1 = hemorrhage on this slice
    order: int  # position within the patient's series
    rotate_clockwise: bool  # phe_sich is stored face-left


@dataclass(frozen=True)
class Dataset:
    """Records plus their cached model views (uint8, 0-255 = [0, 1]).

    ``difficulty`` (optional, per slice in [0, 1]) is how strongly an earlier
    model's out-of-fold prediction called a normal slice a bleed; training
    samples such hard negatives more often.
    """

    records: list[SliceRecord]
    views: np.ndarray
    head_fractions: np.ndarray
    difficulty: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """Slice labels, int64."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def patients(self) -> np.ndarray:
        """Patient key per slice."""
        return np.array([r.patient for r in self.records])

    @property
    def sources(self) -> np.ndarray:
        """Source name per slice."""
        return np.array([r.source for r in self.records])

    @cached_property
    def neighbours(self) -> np.ndarray:
        """(previous, slice, next) index of every slice; see :func:`neighbour_index`."""
        return neighbour_index(self.records)

    def inputs(self, indices: np.ndarray, context: str) -> np.ndarray:
        """The uint8 views a model with ``context`` takes for these slices.

        Returns:
            (N, S, S) for ``2d``; (N, 3, S, S) previous, slice and next for ``2.5d``.
        """
        if context == "2d":
            return self.views[indices]
        if context == "2.5d":
            return self.views[self.neighbours[indices]]
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")


def neighbour_index(records: list[SliceRecord]) -> np.ndarray:
    """Index of each slice's previous slice, itself and next slice in its patient's series.

    Neighbours follow ``order``. Where the series skips an ``order`` the nearest
    existing slice on that side stands in, however far; at a series edge, and for
    a source of single images, the slice stands in for its missing neighbour.

    Returns:
        int64 (len(records), 3).
    """
    index = np.repeat(np.arange(len(records))[:, None], 3, axis=1)
    series: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        series[record.patient].append(i)
    for members in series.values():
        members.sort(key=lambda i: records[i].order)
        for previous, following in pairwise(members):
            index[following, 0] = previous
            index[previous, 2] = following
    return index


def data_dir_from_env() -> Path:
    """``HEMOTRIAGE_DATA_DIR`` or ../shared/data beside the checkout."""
    return Path(os.environ.get(f"{ENV_PREFIX}DATA_DIR", DEFAULT_DATA_DIR))


def index_records(data_dir: Path) -> list[SliceRecord]:
    """Every usable labelled slice of the three sources, in a fixed order."""
    records: list[SliceRecord] = []
    with (data_dir / "kaggle_head_ct" / "labels.csv").open() as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            number = int(row["id"])
            records.append(
                SliceRecord(
                    "kaggle_head_ct",
                    data_dir / "kaggle_head_ct" / "head_ct" / f"{number:03d}.png",
                    f"kaggle_head_ct/{number:03d}",
                    int(row["hemorrhage"]),
                    0,
                    False,
                )
            )
    with (data_dir / "phe_sich" / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            if float(row["content_frac"]) < _MIN_CONTENT_FRAC:
                continue
            records.append(
                SliceRecord(
                    "phe_sich",
                    data_dir / "phe_sich" / row["file"],
                    f"phe_sich/{row['patient_id']}",
                    int(row["label_ich"]),
                    int(row["slice_index"]),
                    True,
                )
            )
    with (data_dir / "ct_ich_dev" / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            records.append(
                SliceRecord(
                    "ct_ich_dev",
                    data_dir / "ct_ich_dev" / row["file"],
                    f"ct_ich_dev/{row['patient_id']}",
                    int(row["label_ich"]),
                    int(row["slice_number"]),
                    False,
                )
            )
    return records


def turn_face_up(image: DecodedImage) -> DecodedImage:
    """Rotate a face-left slice (phe_sich) clockwise, to the face-up orientation of the rest."""
    return DecodedImage(np.rot90(image.pixels, k=-1).copy(), image.is_hu, image.name)


def load_view(record: SliceRecord, spec: ModelSpec, scalp: str = "keep") -> np.ndarray:
    """One record through the client's preprocessing, as a (S, S) float32 view."""
    image = decode_file(record.path)
    if record.rotate_clockwise:
        image = turn_face_up(image)
    return model_view(image, spec, strip_scalp=_strips(scalp))[0]


def load_dataset(
    data_dir: Path,
    spec: ModelSpec,
    records: list[SliceRecord] | None = None,
    scalp: str = "keep",
) -> Dataset:
    """Index (or take) records and return their views, cached under .cache/.

    ``scalp`` (:data:`SCALPS`) chooses whether the views keep what lies outside the skull.
    """
    records = index_records(data_dir) if records is None else records
    variant = ["scalp stripped"] if _strips(scalp) else []
    key = hashlib.sha1(
        "|".join(
            [PREPROCESSING_VERSION, *variant, str(spec.input_size)] + [str(r.path) for r in records]
        ).encode()
    ).hexdigest()[:16]
    cache = REPO_ROOT / ".cache" / f"views-{key}.npz"
    if cache.exists():
        stored = np.load(cache)
        return Dataset(records, stored["views"], stored["head"])
    views = np.empty((len(records), spec.input_size, spec.input_size), dtype=np.uint8)
    head = np.empty(len(records), dtype=np.float32)
    for i, record in enumerate(tqdm(records, desc="preprocess", unit="slice")):
        view = load_view(record, spec, scalp)
        views[i] = np.round(view * 255).astype(np.uint8)
        head[i] = head_fraction(view[None])
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, views=views, head=head)
    return Dataset(records, views, head)


def _strips(scalp: str) -> bool:
    if scalp not in SCALPS:
        raise ValueError(f"scalp must be one of {', '.join(SCALPS)}, got {scalp!r}")
    return scalp == "strip"
