from pathlib import Path

import numpy as np

from build_engines.augment import _jpeg_round_trip, augment_batch, augment_view, resize_batch

ASSETS = Path(__file__).parents[1] / "assets"


def _golden():
    """Three real views (kaggle, ct_ich_dev, phe_sich at 64 px) and their 2D outputs.

    Recorded with the augmentation of commit 86adf4b, before 2.5D input existed.
    """
    return np.load(ASSETS / "augment_2d_golden.npz")


def test_single_views_are_augmented_and_resized_bit_for_bit_as_before_2_5d():
    golden = _golden()
    views = np.concatenate([golden["views"]] * 3)  # nine draws take every random branch
    assert np.array_equal(augment_batch(views, np.random.default_rng(0), 32), golden["augmented"])
    assert np.array_equal(resize_batch(golden["views"], 32), golden["resized"])


def test_the_three_channels_get_one_geometry_and_one_intensity_jitter():
    """A slice repeated three times comes out as three copies, up to per-slice noise."""
    view = _golden()["views"][1]
    stacked = np.stack([view, view, view])
    identical = 0
    for seed in range(20):
        out = augment_view(stacked, np.random.default_rng(seed), 48)
        assert out.shape == (3, 48, 48)
        identical += int(np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2]))
        assert np.abs(out[0] - out[1]).max() < 0.25  # added noise only (sd <= 0.03)
        assert abs(float((out[0] - out[2]).mean())) < 0.01
    assert 4 <= identical <= 16  # the draws without added noise are exact copies


def test_the_slice_stays_in_the_middle_and_its_neighbours_trade_places_half_the_time():
    view = _golden()["views"][1]
    stacked = np.stack([view, view, np.zeros_like(view)])
    swapped = 0
    for seed in range(40):
        out = augment_view(stacked, np.random.default_rng(seed), 48)
        assert out[1].mean() > 0.1
        swapped += int(out[0].mean() < out[2].mean())
    assert 10 <= swapped <= 30


def test_jpeg_compresses_each_channel_as_a_grey_image_not_as_colour():
    views = _golden()["views"].astype(np.float32) / 255.0
    together = _jpeg_round_trip(views.transpose(1, 2, 0), 40)
    for c in range(3):
        assert np.array_equal(together[..., c], _jpeg_round_trip(views[c], 40))


def test_resize_batch_keeps_the_channels_of_a_2_5d_batch_apart():
    views = _golden()["views"]
    batch = resize_batch(np.stack([views, views[::-1]]), 32)
    assert batch.shape == (2, 3, 32, 32)
    golden = _golden()["resized"][:, 0]
    assert np.array_equal(batch[0], golden)
    assert np.array_equal(batch[1], golden[::-1])
