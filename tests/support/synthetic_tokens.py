"""Synthetic token datasets for tests: ``shared.token_dataset.writer.write_dataset`` (the writer of the
contract dataprep writes through) with a placeholder tokenizer provenance, since no tokenizer made these tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple

from shared.token_dataset import Manifest
from shared.token_dataset.writer import write_dataset

SYNTHETIC_TOKENIZER = {"preset": "synthetic", "config": {}, "checkpoint_sha256": "0" * 64}


def write_tokens(root: Path, splits: Mapping[str, Tuple[Any, Sequence[int]]], *, grid: Sequence[int],
                 num_classes: int, resolution: int = 8, **kwargs: Any) -> Manifest:
    """``splits``: {name: (tokens (N, h*w), labels (N,))}; classes are named c0, c1, ..."""
    return write_dataset(root, splits, grid=grid, classes=[f"c{i}" for i in range(num_classes)],
                         resolution=resolution, tokenizer=SYNTHETIC_TOKENIZER, **kwargs)
