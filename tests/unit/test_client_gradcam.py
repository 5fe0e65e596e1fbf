"""Grad-CAM on the torch weights: shape, range, localisation signal and hook hygiene."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.decode import decode_file
from client.gradcam import GradCam, overlay_png
from client.gradcam_plusplus import GradCamPlusPlus
from client.preprocess import model_view, normalize
from client.registry import get_model


@pytest.fixture(scope="module")
def hemorrhage_slice(data_dir: Path) -> Path:
    with (data_dir / "phe_sich" / "labels.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["label_ich"] == "1" and r["n_boxes"] == "1")
    return data_dir / "phe_sich" / row["file"]


def _hook_count(layer) -> int:
    return len(layer._forward_hooks) + len(layer._backward_hooks)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("explainer", [GradCam, GradCamPlusPlus])
def test_heatmap_has_input_size_unit_range_and_is_not_constant(hemorrhage_slice, name, explainer):
    spec = get_model(name)
    tensor = normalize(model_view(decode_file(hemorrhage_slice), spec), spec)
    with explainer(spec) as cam:
        heatmap = cam.heatmap(tensor)
    assert heatmap.shape == (spec.input_size, spec.input_size)
    assert heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.std() > 0.01


def test_hooks_are_released_on_exit_even_after_an_error(hemorrhage_slice):
    spec = get_model("resnet18")
    cam = GradCam(spec)
    layer = cam.target_layer
    assert _hook_count(layer) > 0
    with pytest.raises(ZeroDivisionError), cam:
        1 / 0  # noqa: B018
    assert _hook_count(layer) == 0
    assert not cam.hooked
    cam.release()  # twice is harmless
    with pytest.raises(RuntimeError, match="released"):
        cam.heatmap(np.zeros((3, 224, 224), np.float32))


def test_int8_entry_explains_with_its_fp32_base_weights(hemorrhage_slice):
    spec = get_model("mobilenet_v2_int8")
    tensor = normalize(model_view(decode_file(hemorrhage_slice), spec), spec)
    with GradCam(spec) as cam:
        batch = cam.heatmap(np.stack([tensor, tensor]))
    assert batch.shape == (2, spec.input_size, spec.input_size)
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-5)


def test_overlay_png_decodes_to_the_view_size(hemorrhage_slice):
    spec = get_model("resnet18")
    view = model_view(decode_file(hemorrhage_slice), spec)[0]
    ramp = np.tile(np.linspace(0, 1, 224, dtype=np.float32), (224, 1))
    image = cv2.imdecode(np.frombuffer(overlay_png(view, ramp), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (224, 224, 3)
    assert image[:, -1, 2].mean() > image[:, 0, 2].mean()  # JET: hot (red) where the map is 1


def test_gradcam_cli_writes_an_overlay(hemorrhage_slice, tmp_path, capsys):
    import argparse

    from client.cli_gradcam import add_gradcam_command

    parser = argparse.ArgumentParser()
    add_gradcam_command(parser.add_subparsers())
    out = tmp_path / "cam.png"
    args = parser.parse_args(
        ["gradcam", "--model", "resnet18", str(hemorrhage_slice), "--out", str(out)]
    )
    assert args.run(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "peak at row" in capsys.readouterr().out
