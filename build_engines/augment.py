"""CT-aware augmentation of cached model views (uint8, (S, S)).

Geometry stays plausible for an axial head slice (small rotations, left-right
flips, shifts that keep the head in frame) and varies what differs between
patients: head size and shape in the view (children's round heads and adults'
long ones fill the square view differently, and the out-of-fold false alarms
clustered on round, small heads). Intensity jitter mimics other scanners'
reconstruction kernels and exports (gamma, contrast, noise, resolution loss,
JPEG compression as in video-frame and web exports). The output goes through
the client's ``normalize``, the same call serving uses.

A 2.5D input (a slice with its series neighbours as channels, (3, S, S)) gets
one geometry and one set of jitter parameters for all three channels, since
they are parts of one scan; only the added noise is drawn per channel, as each
slice has its own. Its previous and next slices swap places half the time:
series run skull base to vertex in one source and may run the other way at
another site.

    rng = np.random.default_rng(0)
    batch = augment_batch(views[idx], rng, out_size=160)   # float32 (N, C, S', S') in [0, 1]
"""

from __future__ import annotations

import cv2
import numpy as np


def augment_view(view: np.ndarray, rng: np.random.Generator, out_size: int) -> np.ndarray:
    """One random, plausible variant of a view, resized to ``out_size``, float32 in [0, 1].

    Args:
        view: uint8 (S, S), or (C, S, S) for a slice with its neighbours.
        rng: Source of every random choice.
        out_size: Side of the output.

    Returns:
        float32 (out, out), or (C, out, out).
    """
    size = view.shape[-1]
    # OpenCV transforms (S, S, C) images channel by channel with one matrix.
    image = (view if view.ndim == 2 else view.transpose(1, 2, 0)).astype(np.float32) / 255.0
    angle = rng.uniform(-15, 15)
    scale = rng.uniform(0.75, 1.12)
    aspect = np.exp(rng.uniform(-0.12, 0.12))  # round or long head: stretch one axis
    shift = rng.uniform(-0.06, 0.06, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    stretch = np.array([aspect, 1 / aspect])  # about the centre, after the rotation
    matrix = matrix * stretch[:, None]
    matrix[:, 2] += (size / 2) * (1 - stretch)
    matrix[:, 2] += shift
    if rng.random() < 0.5:  # left-right flip: bleeds occur on either side
        matrix[0] = -matrix[0]
        matrix[0, 2] += size
    # Resample straight to the training size in one interpolation.
    matrix *= out_size / size
    image = cv2.warpAffine(
        image, matrix, (out_size, out_size), flags=cv2.INTER_LINEAR, borderValue=0.0
    )
    if view.ndim == 3 and rng.random() < 0.5:  # the series read the other way
        image = np.ascontiguousarray(image[..., ::-1])
    if rng.random() < 0.3:  # resolution loss: thicker slices, smoother kernels, video exports
        low = int(out_size * rng.uniform(0.5, 0.85))
        image = cv2.resize(
            cv2.resize(image, (low, low), interpolation=cv2.INTER_AREA),
            (out_size, out_size),
            interpolation=cv2.INTER_LINEAR,
        )
    if rng.random() < 0.3:  # lossy export (ct_ich_dev frames are JPEG from scanner video)
        image = _jpeg_round_trip(image, int(rng.integers(30, 90)))
    gamma = np.exp(rng.uniform(-0.35, 0.35))
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    if rng.random() < 0.5:
        image = image + rng.normal(0.0, rng.uniform(0.005, 0.03), image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image if view.ndim == 2 else image.reshape(out_size, out_size, -1).transpose(2, 0, 1)


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode each channel as a grey JPEG.

    A 3-channel image would be encoded as colour, and the chroma planes
    (subsampled YCbCr) would blur one neighbour slice into another.
    """
    if image.ndim == 3:
        return np.stack(
            [_jpeg_round_trip(image[..., c], quality) for c in range(image.shape[2])], -1
        )
    encoded = cv2.imencode(
        ".jpg",
        np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
        [cv2.IMWRITE_JPEG_QUALITY, quality],
    )[1]
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0


def augment_batch(views: np.ndarray, rng: np.random.Generator, out_size: int) -> np.ndarray:
    """Augment each item of a uint8 batch, (N, S, S) or (N, C, S, S); returns (N, C, out, out).

    C is 1 for a batch of single views.
    """
    images = np.stack([augment_view(v, rng, out_size) for v in views])
    return images[:, None] if views.ndim == 3 else images


def resize_batch(views: np.ndarray, out_size: int) -> np.ndarray:
    """Plain (evaluation) views, uint8 (N, S, S) or (N, C, S, S), as (N, C, out, out) in [0, 1]."""
    images = views.astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[:, None]
    if views.shape[-1] != out_size:
        images = np.stack(
            [
                [cv2.resize(c, (out_size, out_size), interpolation=cv2.INTER_AREA) for c in v]
                for v in images
            ]
        )
    return images
