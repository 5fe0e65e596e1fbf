"""The heatmap peak maps back through crop, pad and resize to original pixels."""

import numpy as np
import pytest

from build_engines.cam_eval import ViewGeometry, boxed_slices, peak_in_boxes, view_geometry
from client.decode import DecodedImage
from client.preprocess import model_view
from client.registry import get_model


def _phantom(height: int, width: int, dot: tuple[int, int]) -> np.ndarray:
    """An off-centre elliptical 'head' with a bright dot inside it."""
    yy, xx = np.mgrid[:height, :width]
    dy = (yy - 0.55 * height) / (0.35 * height)
    dx = (xx - 0.4 * width) / (0.25 * width)
    head = dy**2 + dx**2 < 1
    image = np.where(head, 0.4, 0.0).astype(np.float32)
    image[dot[0] - 3 : dot[0] + 4, dot[1] - 3 : dot[1] + 4] = 1.0
    return image


@pytest.mark.parametrize("shape,dot", [((512, 512), (300, 220)), ((400, 640), (250, 200))])
def test_model_view_peak_maps_back_to_the_original_dot(shape, dot):
    spec = get_model("resnet18")
    image = _phantom(*shape, dot)
    view = model_view(DecodedImage(image, is_hu=False, name="phantom"), spec)[0]
    row, col = divmod(int(np.argmax(view)), view.shape[1])
    y, x = view_geometry(image, spec.input_size).to_original(row, col)
    scale = max(shape) / spec.input_size
    assert abs(y - dot[0]) <= 3 + scale and abs(x - dot[1]) <= 3 + scale


def test_peak_in_boxes_uses_original_coordinates():
    geometry = ViewGeometry(
        top=100, left=50, height=200, width=100, pad_top=0, pad_left=50, side=200, size=200
    )
    heatmap = np.zeros((200, 200), np.float32)
    heatmap[10, 60] = 1.0  # original y = 110, x = 60
    assert peak_in_boxes(heatmap, geometry, [(55, 105, 65, 115)])
    assert not peak_in_boxes(heatmap, geometry, [(0, 0, 40, 40)])


def test_boxed_slices_are_the_annotated_phe_sich_slices(data_dir):
    slices = boxed_slices(data_dir)
    assert len(slices) == 725
    path, boxes = slices[0]
    assert path.exists() and all(len(b) == 4 and b[0] < b[2] and b[1] < b[3] for b in boxes)
