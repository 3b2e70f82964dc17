"""Gradient accumulation derived from the effective batch size and the world size."""

import pytest

from experiments.batch_size import derive_accumulation


@pytest.mark.parametrize("devices, nodes, expected", [(1, 1, 16), (2, 1, 8), (8, 1, 2), (4, 1, 4), (8, 2, 1)])
def test_accumulation_keeps_effective_batch(devices, nodes, expected):
    assert derive_accumulation(32, 2, devices, nodes) == expected
    assert expected * 2 * devices * nodes == 32


def test_non_integer_accumulation_fails_clearly():
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(32, 3, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        derive_accumulation(32, 2, 32)
    with pytest.raises(ValueError, match=">= 1"):
        derive_accumulation(32, 0, 1)
