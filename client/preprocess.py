"""The one preprocessing path, from decoded slice to model input.

Training, ONNX parity checks, INT8 calibration, Triton serving, Grad-CAM and the
console all call these functions, so what a model sees in training is exactly
what it sees in the ER. The steps follow the paper (noise reduction, grayscale,
normalization, 224x224) with two changes for generalization across scanners:
the image is cropped to the head, and the aspect ratio is kept by padding.

The split between client and model (issue 10): the client produces the model
input, the view in [0, 1] quantized to uint8 (``round(255 * view)``, three
channels, 150 KB a slice instead of 602 KB of float32), and that is what goes
to Triton, ONNX Runtime and the in-process PyTorch classifier. Normalization
with the registry's mean and std is defined once, in :func:`normalize`; the
exported ONNX graph carries it as its first nodes
(:class:`client.torch_models.InputNormalization`, built from
:func:`normalization_constants`, parity-checked against :func:`normalize`),
and training and Grad-CAM call :func:`normalize` in front of the network.

    spec = get_model("mobilenet_v2")
    tensor = preprocess_file(Path("slice.dcm"), spec)   # uint8 (3, 224, 224)
    normalize(tensor, spec)                             # float32, what the network sees
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
#: Windowed intensity from which a pixel counts as bone: saturated in the brain window.
_BONE_LEVEL = 0.95
#: Below this share of the head's pixels, the bone is not trusted to outline the skull.
_MIN_BONE_SHARE = 0.01


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through a display window (clipped linear ramp)."""
    return np.clip((hu - window.low_hu) / window.width_hu, 0.0, 1.0).astype(np.float32)


def model_view(
    image: DecodedImage, spec: ModelSpec, window_stack: bool = False, strip_scalp: bool = False
) -> np.ndarray:
    """Decoded slice to what the model looks at, before normalization.

    Args:
        image: The decoded slice.
        spec: Model whose input size and window apply.
        window_stack: For DICOM, stack brain/subdural/soft-tissue windows as
            three channels instead of the spec's single window. 8-bit images are
            already windowed and always give one channel.
        strip_scalp: Black out everything outside the skull (scalp swelling,
            skin, head-rest) before cropping to what is left: the ablation of
            issue 9 (``train --scalp strip``); served models see the whole head.

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
    head = _head_mask(channels[0])
    skull = _skull_hull(channels[0], head) if strip_scalp and head is not None else None
    if skull is not None:
        channels = [c * skull for c in channels]
        head = skull
    top, bottom, left, right = _box_around(head, channels[0].shape)
    return np.stack(
        [_pad_square_resize(c[top:bottom, left:right], spec.input_size) for c in channels]
    )


#: Full scale of the uint8 model input: a view value v in [0, 1] is sent as round(v * 255).
INPUT_SCALE = 255.0


def model_input(view: np.ndarray) -> np.ndarray:
    """View(s) in [0, 1], (..., C, S, S) with C = 1 or 3, to the uint8 (..., 3, S, S) model input.

    This is the tensor every classifier takes (Triton, ONNX Runtime, PyTorch):
    ``round(255 * view)``, one channel repeated to three.
    """
    quantized = np.rint(np.clip(view, 0.0, 1.0) * INPUT_SCALE).astype(np.uint8)
    out = np.empty((*view.shape[:-3], 3, *view.shape[-2:]), dtype=np.uint8)
    out[...] = quantized
    return out


def normalization_constants(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """The registry's per-channel (mean, std), float32 (3, 1, 1), on the [0, 1] view scale."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return mean, std


def normalize(view: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The one normalization: view(s) to what the network sees, float32 (..., 3, S, S).

    Args:
        view: float (..., C, S, S) in [0, 1] (a model view, or an augmented
            training view), or the uint8 model input of :func:`model_input`
            (divided by :data:`INPUT_SCALE` first, as the exported graph does).
        spec: Model whose mean and std apply.
    """
    if view.dtype == np.uint8:
        view = view.astype(np.float32) / np.float32(INPUT_SCALE)
    mean, std = normalization_constants(spec)
    out = np.empty((*view.shape[:-3], 3, *view.shape[-2:]), dtype=np.float32)
    out[...] = (view - mean) / std
    return out


def preprocess(image: DecodedImage, spec: ModelSpec, window_stack: bool = False) -> np.ndarray:
    """Decoded slice to the uint8 model input (3, S, S); see :func:`model_input`."""
    return model_input(model_view(image, spec, window_stack))


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


def head_box(unit: np.ndarray) -> tuple[int, int, int, int]:
    """The crop (top, bottom, left, right) of a served view: around the head, with margin.

    ``unit`` is the median-filtered first channel; the frame where no head is found.
    """
    return _box_around(_head_mask(unit), unit.shape)


def _head_mask(unit: np.ndarray) -> np.ndarray | None:
    """The largest bright blob (the head), or None where none is large enough to trust.

    Cropping to the head makes scale comparable across scanners and exports
    (tight publication crops, 650 px video frames, 512 px series) and drops
    figure-panel letters and head-rest arcs, which are separate blobs.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (unit > _HEAD_LEVEL).astype(np.uint8), connectivity=8
    )
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < _MIN_HEAD_AREA * unit.size:
        return None
    return labels == largest


def _skull_hull(unit: np.ndarray, head: np.ndarray) -> np.ndarray | None:
    """The convex hull of the head's bone: the skull and all it holds, not the scalp.

    Bone is what saturates the brain window. None where too little of it shows
    to outline a skull (a window without saturated bone, a blank).
    """
    bone = (unit >= _BONE_LEVEL) & head
    if bone.sum() < _MIN_BONE_SHARE * head.sum():
        return None
    hull = np.zeros(unit.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(bone.astype(np.uint8))), 1)
    return hull.astype(bool)


def _box_around(mask: np.ndarray | None, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of ``mask`` with margin; the frame without one."""
    height, width = shape
    if mask is None:
        return 0, height, 0, width
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y, x = rows[0], cols[0]
    h, w = rows[-1] - y + 1, cols[-1] - x + 1
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
