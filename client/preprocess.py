"""The one preprocessing path, from decoded slice to model tensor.

Training, ONNX parity checks, INT8 calibration, Triton serving, Grad-CAM and the
console all call these functions, so what a model sees in training is exactly
what it sees in the ER. The steps follow the paper (noise reduction, grayscale,
normalization, 224x224) with two changes for generalization across scanners:
the image is cropped to the head, and the aspect ratio is kept by padding.

    spec = get_model("mobilenet_v2")
    tensor = preprocess_file(Path("slice.dcm"), spec)   # float32 (3, 224, 224)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.decode import DecodedImage, decode_bytes, decode_file
from client.registry import (
    BRAIN_WINDOW,
    SOFT_TISSUE_WINDOW,
    SUBDURAL_WINDOW,
    ModelSpec,
    Window,
)

#: The optional 3-window stack (brain, subdural, soft tissue), one per channel.
WINDOW_STACK: tuple[Window, ...] = (BRAIN_WINDOW, SUBDURAL_WINDOW, SOFT_TISSUE_WINDOW)
#: Windowed intensity above which a pixel counts as head rather than air.
_HEAD_LEVEL = 0.08
#: Below this share of the frame the largest blob is not trusted as a head (vertex, blanks).
_MIN_HEAD_AREA = 0.02
#: Margin kept around the head's bounding box, as a share of its larger side.
_CROP_MARGIN = 0.04


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through a display window (clipped linear ramp)."""
    return np.clip((hu - window.low_hu) / window.width_hu, 0.0, 1.0).astype(np.float32)


def model_view(image: DecodedImage, spec: ModelSpec, window_stack: bool = False) -> np.ndarray:
    """Decoded slice to what the model looks at, before normalization.

    Args:
        image: The decoded slice.
        spec: Model whose input size and window apply.
        window_stack: For DICOM, stack brain/subdural/soft-tissue windows as
            three channels instead of the spec's single window. 8-bit images are
            already windowed and always give one channel.

    Returns:
        float32 (C, S, S) in [0, 1], C = 1 or 3, S = ``spec.input_size``.
    """
    if image.is_hu:
        windows = WINDOW_STACK if window_stack else (spec.window,)
        channels = [apply_window(image.pixels, w) for w in windows]
    else:
        channels = [image.pixels.astype(np.float32)]
    # Noise reduction (the paper's first step): a 3x3 median removes speckle and
    # JPEG ringing without blurring the edges of thin subdural collections.
    channels = [cv2.medianBlur(c, 3) for c in channels]
    top, bottom, left, right = _head_box(channels[0])
    return np.stack(
        [_pad_square_resize(c[top:bottom, left:right], spec.input_size) for c in channels]
    )


def normalize(view: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """View(s) in [0, 1], (..., C, S, S) with C = 1 or 3, to normalized (..., 3, S, S) float32."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = np.empty((*view.shape[:-3], 3, *view.shape[-2:]), dtype=np.float32)
    out[...] = (view - mean) / std
    return out


def preprocess(image: DecodedImage, spec: ModelSpec, window_stack: bool = False) -> np.ndarray:
    """Decoded slice to model tensor, float32 (3, S, S)."""
    return normalize(model_view(image, spec, window_stack), spec)


def preprocess_file(path: Path, spec: ModelSpec, window_stack: bool = False) -> np.ndarray:
    """Decode and preprocess one file; raises the typed errors of :mod:`client.decode`."""
    return preprocess(decode_file(path), spec, window_stack)


def preprocess_bytes(
    data: bytes, name: str, spec: ModelSpec, window_stack: bool = False
) -> np.ndarray:
    """Decode and preprocess one upload's bytes."""
    return preprocess(decode_bytes(data, name), spec, window_stack)


def head_fraction(view: np.ndarray) -> float:
    """Share of the model view covered by head (not air): low on vertex and blank slices."""
    return float((view[0] > _HEAD_LEVEL).mean())


def _head_box(unit: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the largest bright blob, with margin.

    Cropping to the head makes scale comparable across scanners and exports
    (tight publication crops, 650 px video frames, 512 px series) and drops
    figure-panel letters and head-rest arcs, which are separate blobs.
    """
    height, width = unit.shape
    mask = (unit > _HEAD_LEVEL).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return 0, height, 0, width
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = stats[largest]
    if area < _MIN_HEAD_AREA * height * width:
        return 0, height, 0, width
    margin = round(_CROP_MARGIN * max(w, h))
    return (
        max(0, y - margin),
        min(height, y + h + margin),
        max(0, x - margin),
        min(width, x + w + margin),
    )


def _pad_square_resize(unit: np.ndarray, size: int) -> np.ndarray:
    """Pad with black to a centred square (keeping the aspect ratio), then resize."""
    height, width = unit.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + height, left : left + width] = unit
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)
