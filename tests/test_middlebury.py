"""Middlebury 2014 "Motorcycle" from scikit-image: depth from disparity, invalid pixels, the evaluation shard."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

from datamodules.middlebury import load_motorcycle, write_middlebury_shard  # noqa: E402
from datamodules.shard_format import decode_sample  # noqa: E402


@pytest.fixture(scope="module")
def raw():
    from skimage.data import stereo_motorcycle

    left, _, disparity = stereo_motorcycle()
    return left, disparity


def test_depth_equals_the_calibration_formula_by_hand(raw):
    _, disparity = raw
    sample = load_motorcycle()
    ys, xs = np.nonzero(np.isfinite(disparity))
    for k in (0, len(ys) // 3, len(ys) // 2, len(ys) - 1):
        y, x = ys[k], xs[k]
        by_hand = 994.978 * 193.001 / (float(disparity[y, x]) + 31.086) / 1000.0  # f * B / (d + doffs), mm -> m
        assert sample["mask"][y, x]
        assert sample["depth"][y, x] == pytest.approx(by_hand, rel=1e-6)
    assert 1.5 < sample["depth"][sample["mask"]].min() < sample["depth"][sample["mask"]].max() < 6.0


def test_missing_disparities_are_invalid(raw):
    left, disparity = raw
    sample = load_motorcycle()
    missing = ~np.isfinite(disparity)
    assert np.isinf(disparity).sum() > 1000  # the shipped array marks them inf, not NaN as documented
    assert not sample["mask"][missing].any() and (sample["depth"][missing] == 0).all()
    assert sample["mask"].sum() == (~missing).sum()
    assert sample["rgb"].shape == (500, 741, 3) and (sample["rgb"] == left).all()


def test_shard_round_trip_keeps_depth_and_protocol(tmp_path):
    import webdataset as wds

    shard = write_middlebury_shard(tmp_path)
    assert write_middlebury_shard(tmp_path) == shard  # reused, not rewritten
    (raw_sample,) = list(wds.WebDataset(str(shard), shardshuffle=False))
    decoded = decode_sample(raw_sample)
    original = load_motorcycle()
    assert (decoded["mask"] == original["mask"]).all()
    valid = original["mask"]
    np.testing.assert_allclose(decoded["depth"][valid], original["depth"][valid], atol=0.5e-4 + 1e-7)
    assert decoded["meta"]["eval_protocol"] == "marigold_depth" and decoded["meta"]["eval_max_depth"] == 10.0
