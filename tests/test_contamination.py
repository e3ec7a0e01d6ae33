"""The contamination split: counts, determinism, overlap, running out, round trip."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from funad.contamination import ContaminationSplit, contaminate
from funad.errors import ConfigError, DataError


def _bottle_like():
    """20 normal train images, then a test set of 5 good and 8 anomalous images."""
    labels = np.array([0] * 20 + [0] * 5 + [1] * 8, dtype=np.int8)
    splits = np.array(["train"] * 20 + ["test"] * 13)
    return labels, splits


def test_no_contamination_keeps_the_splits():
    labels, splits = _bottle_like()
    s = contaminate(labels, splits, ratio=0.0, overlap=False, seed=0)
    assert s.train_idx.tolist() == list(range(20))
    assert s.test_idx.tolist() == list(range(20, 33))
    assert s.n_moved == 0


@pytest.mark.parametrize("ratio, expected", [(0.1, 2), (0.2, 4), (0.25, 5), (0.05, 1), (0.01, 0)])
def test_moves_round_ratio_times_normal_train(ratio, expected):
    labels, splits = _bottle_like()
    s = contaminate(labels, splits, ratio=ratio, overlap=False, seed=3)
    assert s.n_moved == expected
    assert np.all(labels[s.moved_idx] == 1) and np.all(splits[s.moved_idx] == "test")
    assert s.train_idx.size == 20 + expected
    assert s.test_idx.size == 13 - expected


def test_no_overlap_removes_and_overlap_keeps():
    labels, splits = _bottle_like()
    apart = contaminate(labels, splits, ratio=0.2, overlap=False, seed=1)
    both = contaminate(labels, splits, ratio=0.2, overlap=True, seed=1)
    assert apart.moved_idx.tolist() == both.moved_idx.tolist()
    assert not set(apart.moved_idx) & set(apart.test_idx)
    assert set(both.moved_idx) <= set(both.test_idx)
    assert both.test_idx.tolist() == list(range(20, 33))
    for s in (apart, both):
        assert set(s.moved_idx) <= set(s.train_idx)
        assert set(range(20)) <= set(s.train_idx)


def test_same_seed_same_choice_other_seed_differs():
    labels = np.array([0] * 100 + [1] * 50, dtype=np.int8)
    splits = np.array(["train"] * 100 + ["test"] * 50)
    a = contaminate(labels, splits, 0.1, False, seed=7)
    b = contaminate(labels, splits, 0.1, False, seed=7)
    c = contaminate(labels, splits, 0.1, False, seed=8)
    assert a.moved_idx.tolist() == b.moved_idx.tolist()
    assert a.moved_idx.tolist() != c.moved_idx.tolist()
    assert np.all(np.diff(a.moved_idx) > 0)


def test_running_out_moves_all_anomalies_with_warning(caplog):
    labels, splits = _bottle_like()
    with caplog.at_level(logging.WARNING, logger="funad.contamination"):
        s = contaminate(labels, splits, ratio=1.0, overlap=False, seed=0)
    assert s.moved_idx.tolist() == list(range(25, 33))
    assert s.test_idx.tolist() == list(range(20, 25))
    assert "asks for 20 anomalies" in caplog.text and "only 8" in caplog.text


def test_unknown_labels():
    labels = np.full(10, -1, dtype=np.int8)
    splits = np.array(["train"] * 8 + ["test"] * 2)
    s = contaminate(labels, splits, ratio=0.0, overlap=False, seed=0)
    assert s.train_idx.tolist() == list(range(8)) and s.test_idx.tolist() == [8, 9]
    with pytest.raises(ConfigError, match="unknown labels"):
        contaminate(labels, splits, ratio=0.1, overlap=False, seed=0)


def test_bad_inputs():
    labels, splits = _bottle_like()
    with pytest.raises(ConfigError, match="ratio must be >= 0"):
        contaminate(labels, splits, ratio=-0.1, overlap=False, seed=0)
    with pytest.raises(DataError, match="must both have shape"):
        contaminate(labels[:-1], splits, ratio=0.1, overlap=False, seed=0)
    with pytest.raises(DataError, match="'validation'"):
        contaminate(labels, np.where(splits == "test", "validation", splits), 0.1, False, 0)
    with pytest.raises(DataError, match=r"\[2\]"):
        contaminate(np.where(labels == 1, 2, labels), splits, 0.1, False, 0)


def test_dict_round_trip_through_json():
    labels, splits = _bottle_like()
    s = contaminate(labels, splits, ratio=0.2, overlap=True, seed=5)
    back = ContaminationSplit.from_dict(json.loads(json.dumps(s.to_dict())))
    for name in ("train_idx", "test_idx", "moved_idx"):
        assert np.array_equal(getattr(back, name), getattr(s, name))
        assert getattr(back, name).dtype == np.int64
    assert (back.ratio, back.overlap, back.seed) == (0.2, True, 5)
    with pytest.raises(ConfigError, match="moved_idx"):
        ContaminationSplit.from_dict({k: v for k, v in s.to_dict().items() if k != "moved_idx"})


def test_moving_every_test_anomaly_without_overlap_warns_that_no_auroc_is_left(caplog):
    labels = np.array([0] * 20 + [0] * 5 + [1] * 2)
    splits = np.array(["train"] * 20 + ["test"] * 7)
    with caplog.at_level("WARNING"):
        split = contaminate(labels, splits, 0.5, overlap=False, seed=0)
    assert split.moved_idx.size == 2 and "no anomalous test image is left" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        contaminate(labels, splits, 0.5, overlap=True, seed=0)
    assert "moving all of them" in caplog.text and "no anomalous test image" not in caplog.text
