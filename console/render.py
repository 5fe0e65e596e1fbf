"""PNG renderings of stored slices: the model view, and its Grad-CAM overlay.

The study page shows exactly what the model looked at (the cropped, windowed,
resized view from :func:`client.preprocess.model_view`), not the raw file. The
Grad-CAM overlay runs :class:`client.gradcam.GradCam` on the spec's PyTorch
weights; the explainer is built on first use and shared, one request at a time.

    png = slice_png(path, spec)
    png = CamRenderer(spec).overlay_png(path)
    rgb = CamRenderer(spec).overlay_rgb(path)      # for the PACS secondary capture
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from client.decode import decode_file
from client.preprocess import model_view, normalize
from client.registry import ModelSpec


def _encode_png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("OpenCV could not encode the slice as PNG")
    return encoded.tobytes()


def slice_png(path: Path, spec: ModelSpec) -> bytes:
    """The model view of a stored slice as an 8-bit grayscale PNG.

    Raises:
        HemoTriageError: the stored file no longer decodes.
    """
    view = model_view(decode_file(path), spec)[0]
    return _encode_png(np.uint8(np.round(255 * np.clip(view, 0.0, 1.0))))


class CamRenderer:
    """Grad-CAM overlays for one model, with the explainer built on first use.

    Args:
        spec: The model whose weights are explained.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._cam = None

    def overlay_png(self, path: Path) -> bytes:
        """The slice's model view with the hemorrhage heatmap blended on, as RGB PNG.

        Raises:
            HemoTriageError: the stored file no longer decodes, or the weights are missing.
        """
        from client.gradcam import overlay_png

        return overlay_png(*self._explain(path))

    def overlay_rgb(self, path: Path) -> np.ndarray:
        """The same overlay as uint8 (H, W, 3) RGB pixels (the PACS secondary capture).

        Raises:
            HemoTriageError: the stored file no longer decodes, or the weights are missing.
        """
        from client.gradcam import overlay

        return overlay(*self._explain(path))

    def _explain(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The slice's model view (H, W) and its Grad-CAM heatmap."""
        from client.gradcam import GradCam

        view = model_view(decode_file(path), self.spec)
        # The hooks hold per-call activations: one explanation at a time.
        with self._lock:
            if self._cam is None:
                self._cam = GradCam(self.spec)
            heatmap = self._cam.heatmap(normalize(view, self.spec))
        return view[0], heatmap

    def release(self) -> None:
        """Remove the explainer's hooks (on shutdown)."""
        with self._lock:
            if self._cam is not None:
                self._cam.release()
                self._cam = None
