"""``python -m client gradcam``: a Grad-CAM overlay PNG for one slice.

    python -m client gradcam --model resnet18 slice.dcm --out slice_cam.png

Registered by ``client/__main__.py`` through :func:`add_gradcam_command`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.decode import decode_file
from client.gradcam import CamExplainer, GradCam, overlay_png
from client.gradcam_plusplus import GradCamPlusPlus
from client.preprocess import model_view, normalize
from client.registry import get_model, list_models

#: --method values and the explainer class each one names.
METHODS: dict[str, type[CamExplainer]] = {"gradcam": GradCam, "gradcam++": GradCamPlusPlus}


def add_gradcam_command(subparsers) -> None:
    """Add the ``gradcam`` subcommand to ``python -m client``'s subparsers."""
    parser = subparsers.add_parser("gradcam", help="write a Grad-CAM overlay PNG for one slice")
    parser.add_argument("--model", default="mobilenet_v2", choices=[s.name for s in list_models()])
    parser.add_argument("--method", default="gradcam", choices=list(METHODS))
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--out", type=Path, required=True, help="overlay PNG to write")
    parser.add_argument("file", type=Path, help="one PNG, JPEG or DICOM slice")
    parser.set_defaults(run=run_gradcam)


def run_gradcam(args: argparse.Namespace) -> int:
    """Explain ``args.file`` with ``args.model`` and write the overlay; return the exit status.

    Raises:
        HemoTriageError: the file cannot be decoded or the weights are missing.
    """
    spec = get_model(args.model)
    view = model_view(decode_file(args.file), spec)
    with METHODS[args.method](spec, device=args.device) as cam:
        heatmap = cam.heatmap(normalize(view, spec))
    args.out.write_bytes(overlay_png(view[0], heatmap))
    peak_row, peak_col = divmod(int(heatmap.argmax()), heatmap.shape[1])
    sys.stdout.write(f"{args.out}  peak at row {peak_row}, col {peak_col} of the model view\n")
    return 0
