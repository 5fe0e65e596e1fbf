from pathlib import Path

import numpy as np
import pytest

from build_engines.data import Dataset, SliceRecord, index_records, neighbour_index


def _record(patient: str, order: int, source: str = "ct_ich_dev") -> SliceRecord:
    return SliceRecord(source, Path(f"{patient}_{order}.jpg"), patient, 0, order, False)


def test_neighbours_follow_order_whatever_the_record_order_and_edges_repeat_the_slice():
    records = [_record("a", 2), _record("a", 0), _record("a", 1)]
    assert neighbour_index(records).tolist() == [[2, 0, 0], [1, 1, 2], [1, 2, 0]]


def test_a_gap_in_order_takes_the_nearest_existing_slice_on_that_side():
    records = [_record("a", 3), _record("a", 7), _record("a", 8)]
    assert neighbour_index(records).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]


def test_a_lone_image_is_its_own_neighbour_and_patients_never_mix():
    records = [
        _record("k", 0, "kaggle_head_ct"),
        _record("a", 1),
        _record("b", 1),
        _record("a", 2),
        _record("b", 2),
    ]
    assert neighbour_index(records).tolist() == [
        [0, 0, 0],
        [1, 1, 3],
        [2, 2, 4],
        [1, 3, 3],
        [2, 4, 4],
    ]


def test_real_series_neighbours_are_the_adjacent_slices_of_the_same_patient(data_dir: Path):
    records = index_records(data_dir)
    index = neighbour_index(records)
    for i, (previous, following) in enumerate(index[:, [0, 2]]):
        record = records[i]
        if record.source == "kaggle_head_ct":
            assert previous == following == i
            continue
        for j, step in ((previous, -1), (following, 1)):
            assert records[j].patient == record.patient
            assert j == i or records[j].order == record.order + step
    series = {r.patient for r in records}
    assert (index[:, 0] == np.arange(len(records))).sum() == len(series)  # one first slice each


def test_inputs_stack_previous_slice_and_next_as_channels_and_2d_is_the_view_itself():
    records = [_record("k", 0, "kaggle_head_ct"), _record("a", 1), _record("a", 2), _record("a", 3)]
    views = np.arange(4, dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), np.uint8)
    dataset = Dataset(records, views, np.zeros(4, np.float32))
    stacked = dataset.inputs(np.array([0, 1, 2, 3]), "2.5d")
    assert stacked.shape == (4, 3, 8, 8)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 0], [1, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert np.array_equal(dataset.inputs(np.array([2, 0]), "2d"), views[[2, 0]])
    with pytest.raises(ValueError, match="context"):
        dataset.inputs(np.array([0]), "3d")
