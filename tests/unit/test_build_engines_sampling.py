"""Training draws every (source, label) cell at its share; inside it, hard negatives more often
and, when asked, every patient equally often."""

from pathlib import Path

import numpy as np
import pytest

from build_engines.data import Dataset, SliceRecord
from build_engines.train import CELL_WEIGHTS, sample_weights


def _dataset(difficulty=None) -> Dataset:
    records = [
        SliceRecord(source, Path(f"/d/{source}/x/{i}.png"), f"{source}/{i}", label, i, False)
        for source in ("kaggle_head_ct", "phe_sich", "ct_ich_dev")
        for label in (0, 1)
        for i in range(4)
    ]
    n = len(records)
    return Dataset(records, np.zeros((n, 1, 1), np.uint8), np.zeros(n, np.float32), difficulty)


def _cell_shares(dataset: Dataset, weights: np.ndarray) -> dict:
    shares: dict = {}
    for record, w in zip(dataset.records, weights, strict=True):
        cell = (record.source, record.label)
        shares[cell] = shares.get(cell, 0.0) + w
    return shares


def test_hard_negatives_are_drawn_more_often_and_cell_shares_stay():
    difficulty = np.zeros(24, np.float32)
    hard = 16  # the first normal ct_ich_dev slice: an earlier model called it a bleed
    difficulty[hard] = 0.9
    plain = _dataset()
    boosted = _dataset(difficulty)
    indices = np.arange(24)

    before = sample_weights(plain, indices)
    after = sample_weights(boosted, indices, hard_negative_boost=3.0)

    assert after[hard] / after[hard + 1] == pytest.approx(1 + 3.0 * 0.9)
    assert plain.records[hard].source == "ct_ich_dev" and plain.records[hard].label == 0
    expected = {cell: share / sum(CELL_WEIGHTS.values()) for cell, share in CELL_WEIGHTS.items()}
    for shares in (_cell_shares(plain, before), _cell_shares(boosted, after)):
        assert shares.keys() == expected.keys()
        for cell, share in shares.items():
            assert abs(share - expected[cell]) < 1e-9
    # Without a boost, difficulty changes nothing.
    assert np.allclose(sample_weights(boosted, indices), before)


def test_patient_sampling_draws_a_two_slice_bleed_as_often_as_a_six_slice_one():
    """Inside a cell each patient gets the same share, whatever its slice count."""
    records = [
        SliceRecord("ct_ich_dev", Path(f"/d/{patient}_{i}.jpg"), patient, 1, i, False)
        for patient, n in (("ct_ich_dev/small", 2), ("ct_ich_dev/large", 6))
        for i in range(n)
    ]
    records += [SliceRecord("ct_ich_dev", Path("/d/n.jpg"), "ct_ich_dev/normal", 0, 0, False)]
    n = len(records)
    dataset = Dataset(records, np.zeros((n, 1, 1), np.uint8), np.zeros(n, np.float32))
    indices = np.arange(n)

    by_slice = sample_weights(dataset, indices)
    by_patient = sample_weights(dataset, indices, sampling="patient")

    small, large = by_patient[:2].sum(), by_patient[2:8].sum()
    assert small == pytest.approx(large)
    assert by_slice[:2].sum() == pytest.approx(by_slice[2:8].sum() / 3)
    # The cells keep their shares.
    assert by_patient[:8].sum() == pytest.approx(by_slice[:8].sum())
    assert by_patient[8] == pytest.approx(by_slice[8])
