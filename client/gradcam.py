"""Grad-CAM heatmaps: where in the slice the model found hemorrhage.

Explanations run on the PyTorch weights named by the spec (TensorRT and ONNX
engines have no gradients), through the ``grad-cam`` package. :class:`CamExplainer`
owns the model, the hooks on ``spec.cam_target_layer``, the forward and
backward pass, the scaling to [0, 1] and :meth:`~CamExplainer.release`; each
variant overrides only :meth:`~CamExplainer._make_cam` and lives in its own
short module (:mod:`client.gradcam_plusplus`). Use it as a context manager so
the hooks come off the model when you are done. torch is imported lazily, so
the console imports this module without it.

    with GradCam(get_model("resnet18")) as cam:
        heatmap = cam.heatmap(preprocess_file(path, spec))   # (224, 224) in [0, 1]
    png = overlay_png(model_view(decode_file(path), spec)[0], heatmap)

Selvaraju et al., "Grad-CAM", ICCV 2017, eq. 1-2.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import cv2
import numpy as np

from client.registry import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Output column of the hemorrhage class, the Grad-CAM target.
HEMORRHAGE_CLASS = 1
#: Share of the overlay that is heatmap colour (the rest is the grayscale slice).
OVERLAY_WEIGHT = 0.4


class CamExplainer:
    """Base class: hooks, forward/backward pass, scaling and release.

    Args:
        spec: The model to explain; int8 entries use their fp32 base weights.
        device: ``cpu`` or ``cuda``.
        model: An already loaded torch model to explain instead of the spec's weights.

    Raises:
        MissingWeightsError: the spec's weights are absent or fail their checksum.
        ValueError: ``spec.cam_target_layer`` is not a module of the model.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu", model: torch.nn.Module | None = None):
        if model is None:
            from client.torch_models import load_model

            model = load_model(spec, device)
        self.spec = spec
        self.model = model.eval()
        self.target_layer = _find_layer(model, spec.cam_target_layer)
        self._cam = self._make_cam(model, [self.target_layer])

    def _make_cam(self, model: torch.nn.Module, target_layers: list):
        """The ``pytorch_grad_cam`` object of this variant (registers the hooks)."""
        raise NotImplementedError

    def heatmap(self, tensor: np.ndarray, target_class: int = HEMORRHAGE_CLASS) -> np.ndarray:
        """Heatmap of one preprocessed slice, or of each slice of a batch.

        Args:
            tensor: float32 (3, S, S) or (N, 3, S, S) from :mod:`client.preprocess`.
            target_class: Output column to explain (1 = hemorrhage).

        Returns:
            float32 (S, S) or (N, S, S) in [0, 1]; 1 is the most influential region.

        Raises:
            RuntimeError: the explainer was released.
        """
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self._cam is None:
            raise RuntimeError("this explainer was released; create a new one")
        single = tensor.ndim == 3
        batch = torch.from_numpy(np.ascontiguousarray(tensor[None] if single else tensor))
        batch = batch.to(next(self.model.parameters()).device)
        targets = [ClassifierOutputTarget(target_class)] * len(batch)
        maps = self._cam(input_tensor=batch, targets=targets)
        maps = np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0)
        return maps[0] if single else maps

    @property
    def hooked(self) -> bool:
        """Whether hooks are still registered on the target layer."""
        return self._cam is not None

    def release(self) -> None:
        """Remove the forward hooks from the model; safe to call twice."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def __enter__(self) -> CamExplainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class GradCam(CamExplainer):
    """Grad-CAM: channel weights are the spatially averaged gradients."""

    def _make_cam(self, model, target_layers):
        from pytorch_grad_cam import GradCAM

        return GradCAM(model=model, target_layers=target_layers)


def overlay(view: np.ndarray, heatmap: np.ndarray, weight: float = OVERLAY_WEIGHT) -> np.ndarray:
    """Blend a JET-coloured heatmap onto a grayscale slice.

    Args:
        view: (H, W) grayscale in [0, 1], e.g. the model view of the slice.
        heatmap: (h, w) in [0, 1]; resized to the view if needed.
        weight: Share of heatmap colour in the blend.

    Returns:
        uint8 (H, W, 3) RGB.
    """
    height, width = view.shape
    if heatmap.shape != view.shape:
        heatmap = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    gray = np.repeat(np.clip(view, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    return np.uint8(255 * ((1 - weight) * gray + weight * colour))


def overlay_png(view: np.ndarray, heatmap: np.ndarray, weight: float = OVERLAY_WEIGHT) -> bytes:
    """:func:`overlay` encoded as PNG bytes (for files and the console)."""
    rgb = overlay(view, heatmap, weight)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return encoded.tobytes()


def _find_layer(model, dotted: str):
    try:
        return model.get_submodule(dotted)
    except AttributeError as e:
        raise ValueError(f"no layer {dotted!r} in {type(model).__name__}") from e
