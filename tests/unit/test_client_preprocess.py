from pathlib import Path

import numpy as np
import pytest

from benchmarks.phantoms import BLOOD_HU, BRAIN_HU, Lesion, head_phantom
from client.decode import DecodedImage
from client.preprocess import (
    apply_window,
    head_fraction,
    model_input,
    model_view,
    normalize,
    preprocess,
    preprocess_file,
)
from client.registry import BRAIN_WINDOW, get_model

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPEC = get_model("mobilenet_v2")


def _phantom_image() -> DecodedImage:
    return DecodedImage(head_phantom(256, Lesion(0.25, -0.2, 0.1)), is_hu=True, name="phantom")


def test_brain_window_maps_level_to_middle_gray_and_clips():
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    np.testing.assert_allclose(apply_window(hu, BRAIN_WINDOW), [0, 0, 0.5, 1, 1])


def test_preprocess_gives_the_uint8_nchw_model_input_of_the_spec_size():
    view = model_view(_phantom_image(), SPEC)
    tensor = preprocess(_phantom_image(), SPEC)
    assert tensor.shape == (3, SPEC.input_size, SPEC.input_size)
    assert tensor.dtype == np.uint8
    # round(255 * view): at most half a step from the float view, on every channel.
    assert np.abs(tensor / 255.0 - view).max() <= 0.5 / 255 + 1e-6
    assert (tensor[0] == tensor[1]).all() and (tensor[0] == tensor[2]).all()


def test_normalize_gives_the_same_tensor_from_the_uint8_input_and_its_float_view():
    tensor = preprocess(_phantom_image(), SPEC)
    from_uint8 = normalize(tensor, SPEC)
    assert from_uint8.dtype == np.float32 and from_uint8.shape == tensor.shape
    np.testing.assert_allclose(from_uint8, normalize(tensor[:1] / np.float32(255), SPEC), atol=1e-6)
    low = (0 - SPEC.mean[0]) / SPEC.std[0]
    high = (1 - SPEC.mean[0]) / SPEC.std[0]
    assert from_uint8.min() >= low - 1e-6 and from_uint8.max() <= high + 1e-6


def test_model_input_clips_and_rounds_half_steps():
    view = np.array([[[-0.2, 0.0, 0.5 / 255 + 1e-4, 0.5, 1.0, 1.3]]], np.float32)
    assert model_input(view)[0, 0].tolist() == [0, 0, 1, 128, 255, 255]


def test_blood_is_brighter_than_brain_after_windowing():
    image = DecodedImage(np.array([[BRAIN_HU, BLOOD_HU]]), is_hu=True, name="x")
    windowed = apply_window(image.pixels, BRAIN_WINDOW)
    assert windowed[0, 1] > windowed[0, 0] + 0.4


def test_preprocess_keeps_aspect_ratio_by_padding():
    # A wide head-like ellipse (2.5 : 1) must keep its shape: padded, not stretched.
    yy, xx = np.mgrid[0:300, 0:700]
    frame = (((xx - 350) / 250.0) ** 2 + ((yy - 150) / 100.0) ** 2 <= 1).astype(np.float32) * 0.6
    view = model_view(DecodedImage(frame, is_hu=False, name="wide"), SPEC)[0]
    rows = np.flatnonzero((view > 0.3).any(axis=1))
    cols = np.flatnonzero((view > 0.3).any(axis=0))
    aspect = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
    assert aspect == pytest.approx(2.5, rel=0.05)


def test_window_stack_gives_three_distinct_channels_for_dicom():
    view = model_view(_phantom_image(), SPEC, window_stack=True)
    assert view.shape == (3, SPEC.input_size, SPEC.input_size)
    assert not np.allclose(view[0], view[1])
    assert preprocess(_phantom_image(), SPEC, window_stack=True).shape == (3, 224, 224)


def test_head_crop_ignores_small_far_blobs_like_panel_letters():
    image = head_phantom(300)
    unit = apply_window(image, BRAIN_WINDOW)
    with_letter = unit.copy()
    with_letter[5:25, 5:20] = 1.0  # a figure-panel letter in the corner
    a = model_view(DecodedImage(unit, is_hu=False, name="a"), SPEC)
    b = model_view(DecodedImage(with_letter, is_hu=False, name="b"), SPEC)
    assert np.abs(a - b).mean() < 0.01


def test_head_fraction_is_low_for_a_vertex_cap_and_high_mid_brain():
    big = model_view(DecodedImage(head_phantom(256), is_hu=True, name="mid"), SPEC)
    blank = model_view(
        DecodedImage(np.full((256, 256), -1000.0, np.float32), is_hu=True, name="air"), SPEC
    )
    assert head_fraction(big) > 0.4
    assert head_fraction(blank) == 0.0


def test_preprocess_matches_golden_array_for_synthetic_dicom(tmp_path):
    # Golden file written once from this phantom; any change to the preprocessing
    # path shows up here and must come with a PREPROCESSING_VERSION bump.
    golden = np.load(ASSETS / "golden_phantom_view.npz")
    view = model_view(_phantom_image(), SPEC)
    np.testing.assert_allclose(view, golden["view"].astype(np.float32), atol=2e-3)


def test_preprocess_file_reads_real_images_from_every_source(data_dir: Path):
    for path in (
        data_dir / "kaggle_head_ct/head_ct/000.png",
        data_dir / "phe_sich/images/0001_10.png",
        data_dir / "ct_ich_dev/brain/049_15.jpg",
        data_dir / "cq500_ct1/single_5mm/CT000000.dcm",
    ):
        tensor = preprocess_file(path, SPEC)
        assert tensor.shape == (3, 224, 224) and tensor.dtype == np.uint8
        assert normalize(tensor, SPEC).std() > 0.1


def _with_scalp_swelling(hu: np.ndarray) -> np.ndarray:
    """The phantom with a blood-dense swelling on the scalp, outside the skull (trauma)."""
    size = hu.shape[0]
    yy, xx = np.mgrid[-1 : 1 : complex(size), -1 : 1 : complex(size)]
    swelling = ((xx - 0.70) / 0.16) ** 2 + ((yy + 0.2) / 0.30) ** 2 <= 1.0
    out = hu.copy()
    out[swelling & (hu == hu.min())] = BLOOD_HU
    return out


def test_stripping_the_scalp_leaves_only_what_lies_inside_the_skull():
    plain = DecodedImage(head_phantom(256, Lesion(0.25, -0.2, 0.1)), is_hu=True, name="plain")
    swollen = DecodedImage(_with_scalp_swelling(plain.pixels), is_hu=True, name="swollen")
    # As served, the swelling is part of the head: the crop widens and it shows.
    assert np.abs(model_view(swollen, SPEC) - model_view(plain, SPEC)).mean() > 0.02
    # Stripped, the swollen head gives the plain head's view, bleed inside the skull kept.
    stripped = model_view(swollen, SPEC, strip_scalp=True)
    assert np.abs(stripped - model_view(plain, SPEC, strip_scalp=True)).mean() < 0.005
    assert np.abs(stripped - model_view(plain, SPEC)).mean() < 0.005


def test_stripping_keeps_the_whole_head_where_no_bone_outlines_a_skull():
    # A windowed 8-bit slice whose bone never saturates (another window, a figure).
    unit = apply_window(_with_scalp_swelling(head_phantom(256)), BRAIN_WINDOW) * 0.8
    image = DecodedImage(unit, is_hu=False, name="dim")
    np.testing.assert_array_equal(
        model_view(image, SPEC, strip_scalp=True), model_view(image, SPEC)
    )
