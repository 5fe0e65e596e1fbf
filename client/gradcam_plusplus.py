"""Grad-CAM++: a variant of :class:`client.gradcam.CamExplainer` for several lesions per slice.

Grad-CAM++ weights each channel by positive second-order gradient terms, which
separates multiple bleeds on one slice better than plain Grad-CAM.

    with GradCamPlusPlus(get_model("mobilenet_v2")) as cam:
        heatmap = cam.heatmap(tensor)

Chattopadhyay et al., "Grad-CAM++", WACV 2018, eq. 19.
"""

from __future__ import annotations

from client.gradcam import CamExplainer


class GradCamPlusPlus(CamExplainer):
    """Grad-CAM++ through ``pytorch_grad_cam.GradCAMPlusPlus``."""

    def _make_cam(self, model, target_layers):
        from pytorch_grad_cam import GradCAMPlusPlus

        return GradCAMPlusPlus(model=model, target_layers=target_layers)
