"""Validation padding of the batch contract: samples keyed `__pad__` (empty masks) that no metric may count."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PAD_KEY = "__pad__"  # the key datamodules give padding; the two packages share it through the batch contract


def drop_padding(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The batch without its padding samples (tensors and per-sample lists alike); None if nothing is left."""
    keep = [i for i, key in enumerate(batch["key"]) if key != PAD_KEY]
    if not keep:
        return None
    if len(keep) == len(batch["key"]):
        return batch
    index = torch.tensor(keep, device=batch["rgb"].device)
    return {k: (v[index] if isinstance(v, Tensor) else [v[i] for i in keep]) for k, v in batch.items()}
