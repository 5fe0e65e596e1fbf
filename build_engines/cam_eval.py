"""Does Grad-CAM point at the bleed? A pointing-game score on the boxed phe_sich slices.

PHE-SICH-CT-IDS annotates each haematoma (with its oedema ring) by a box in the
original 512x512 pixels. For every boxed slice the heatmap is computed on the
model input, its peak is mapped back through preprocessing's head crop,
square padding and resize to original pixel coordinates, and the slice counts
as a hit when the peak falls inside a box (Zhang et al., "Top-down neural
attention by excitation backprop", ECCV 2016: the pointing game). Slices and
boxes are turned face-up first, as in training (phe_sich is stored face-left).

The chance level is the mean share of the head crop covered by boxes: the hit
rate of a peak dropped uniformly on the head.

    result = localization_score(get_model("resnet18"))
    result.hit_rate, result.chance_rate

    python -m build_engines cam-eval --model resnet18
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from build_engines.data import data_dir_from_env, turn_face_up
from client.decode import decode_file
from client.gradcam import CamExplainer, GradCam
from client.preprocess import head_box, model_view, normalize
from client.registry import ModelSpec

logger = logging.getLogger(__name__)

#: (x0, y0, x1, y1) in original pixels.
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ViewGeometry:
    """How a slice maps onto the model input: head crop, centred square pad, resize.

    Attributes:
        top: First original row of the head crop.
        left: First original column of the head crop.
        height: Rows of the head crop.
        width: Columns of the head crop.
        pad_top: Rows of padding above the crop in the square.
        pad_left: Columns of padding left of the crop in the square.
        side: Side of the padded square, in original pixels.
        size: Side of the model input.
    """

    top: int
    left: int
    height: int
    width: int
    pad_top: int
    pad_left: int
    side: int
    size: int

    def to_original(self, row: float, col: float) -> tuple[float, float]:
        """Model-input pixel (row, col) to original (y, x), mapping centres as cv2.resize does."""
        scale = self.side / self.size
        y = (row + 0.5) * scale - 0.5 - self.pad_top + self.top
        x = (col + 0.5) * scale - 0.5 - self.pad_left + self.left
        return y, x


@dataclass(frozen=True)
class CamLocalization:
    """Pointing-game result of one model."""

    model: str
    n_slices: int
    hits: int
    chance_rate: float

    @property
    def hit_rate(self) -> float:
        """Share of boxed slices whose heatmap peak lies inside a box."""
        return self.hits / self.n_slices if self.n_slices else float("nan")


def view_geometry(unit: np.ndarray, size: int) -> ViewGeometry:
    """The crop/pad/resize that :func:`client.preprocess.model_view` applies to ``unit``.

    Args:
        unit: The decoded slice in [0, 1] (one channel), before the median filter.
        size: Model input side.
    """
    top, bottom, left, right = head_box(cv2.medianBlur(unit.astype(np.float32), 3))
    height, width = bottom - top, right - left
    side = max(height, width)
    return ViewGeometry(
        top, left, height, width, (side - height) // 2, (side - width) // 2, side, size
    )


def boxed_slices(data_dir: Path | None = None) -> list[tuple[Path, list[Box]]]:
    """The phe_sich slices with at least one haematoma box, and their boxes."""
    root = (data_dir or data_dir_from_env()) / "phe_sich"
    slices = []
    with (root / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            if int(row["label_ich"]) != 1 or not row["boxes_xyxy"].strip():
                continue
            boxes = [
                tuple(float(v) for v in box.split(","))
                for box in row["boxes_xyxy"].split(";")
                if box.strip()
            ]
            slices.append((root / row["file"], boxes))
    return slices


def peak_in_boxes(heatmap: np.ndarray, geometry: ViewGeometry, boxes: list[Box]) -> bool:
    """Whether the heatmap's maximum, mapped to original pixels, lies in any box."""
    row, col = divmod(int(np.argmax(heatmap)), heatmap.shape[1])
    y, x = geometry.to_original(row, col)
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def localization_score(
    spec: ModelSpec,
    explainer: type[CamExplainer] = GradCam,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    data_dir: Path | None = None,
) -> CamLocalization:
    """Pointing-game hit rate of ``spec``'s heatmaps on the boxed phe_sich slices.

    Args:
        spec: The model to explain (its torch weights).
        explainer: Grad-CAM variant.
        limit: Evaluate only the first ``limit`` boxed slices (for quick runs).
        batch_size: Slices per forward/backward pass.
        device: torch device.
        data_dir: Data folder; ``HEMOTRIAGE_DATA_DIR`` or ../shared/data by default.

    Returns:
        Hits, slices and the chance rate.
    """
    slices = boxed_slices(data_dir)[:limit]
    hits, chance = 0, []
    with explainer(spec, device=device) as cam:
        for start in range(0, len(slices), batch_size):
            chunk = slices[start : start + batch_size]
            images = [turn_face_up(decode_file(path)) for path, _ in chunk]
            batch = np.stack([normalize(model_view(image, spec), spec) for image in images])
            heatmaps = cam.heatmap(batch)
            for image, (_, stored), heatmap in zip(images, chunk, heatmaps, strict=True):
                boxes = [_box_face_up(box, stored_height=image.pixels.shape[1]) for box in stored]
                geometry = view_geometry(image.pixels, spec.input_size)
                hits += peak_in_boxes(heatmap, geometry, boxes)
                chance.append(_box_share(geometry, boxes))
    chance_rate = float(np.mean(chance)) if chance else float("nan")
    result = CamLocalization(spec.name, len(slices), hits, chance_rate)
    logger.info(
        "%s: heatmap peak inside a box on %d/%d slices (%.3f; chance %.3f)",
        spec.name,
        result.hits,
        result.n_slices,
        result.hit_rate,
        result.chance_rate,
    )
    return result


def _box_face_up(box: Box, stored_height: int) -> Box:
    """A box of the stored (face-left) slice in the clockwise-rotated slice's coordinates."""
    x0, y0, x1, y1 = box
    return (stored_height - y1, x0, stored_height - y0, x1)


def _box_share(geometry: ViewGeometry, boxes: list[Box]) -> float:
    """Share of the head crop that the boxes cover (union, clipped to the crop)."""
    height, width = geometry.height, geometry.width
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        r0, r1 = int(max(0, y0 - geometry.top)), int(min(height, y1 - geometry.top + 1))
        c0, c1 = int(max(0, x0 - geometry.left)), int(min(width, x1 - geometry.left + 1))
        mask[r0:r1, c0:c1] = True
    return float(mask.mean())
