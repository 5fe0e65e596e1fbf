"""Reference predictions recorded with the weights, so tests can prove they reproduce.

After training, a few fixed real slices are scored through the client's file
path (decode, preprocess, fp16 weights loaded back) and the probabilities are
stored in the weights sidecar. ``tests`` reload the committed weights and must
get the same numbers.

    facts["reference_predictions"] = reference_predictions(spec, weights_path, data_dir)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from client.decode import decode_file
from client.preprocess import model_view, normalize
from client.registry import ModelSpec
from client.torch_models import build_model

#: Fixed slices (relative to the data folder): both classes, every source, and DICOM.
REFERENCE_FILES = (
    "kaggle_head_ct/head_ct/003.png",
    "kaggle_head_ct/head_ct/150.png",
    "ct_ich_dev/brain/049_15.jpg",
    "phe_sich/images/0002_05.png",
    "cq500_ct1/single_5mm/CT000000.dcm",
)


def reference_predictions(spec: ModelSpec, weights_path: Path, data_dir: Path) -> dict[str, float]:
    """P(hemorrhage) for each reference file present, with the saved fp16 weights."""
    model = build_model(spec)
    model.load_state_dict({k: v.float() for k, v in load_file(weights_path).items()})
    model.eval()
    out = {}
    with torch.inference_mode():
        for name in REFERENCE_FILES:
            path = data_dir / name
            if path.exists():
                x = torch.from_numpy(_float_path(path, spec))[None]
                out[name] = round(float(torch.softmax(model(x), 1)[0, 1]), 6)
    return out


def _float_path(path: Path, spec: ModelSpec) -> np.ndarray:
    """The float view normalized, without the uint8 rounding of the served input.

    The recorded predictions predate the uint8 model input (issue 10); they
    pin the weights, and the float view reproduces them exactly. The uint8
    input moves them by a few 1e-4 (measured by benchmarks/bench_wire.py).
    """
    return normalize(model_view(decode_file(path), spec), spec)
