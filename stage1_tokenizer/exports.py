"""A tokenizer's two weight sets, where a Stage-1 run exports each, and which one a tool that encodes tokens takes.

    raw   the generator's own weights. The official AR recipe encodes its training tokens with them (the
          official AR checkpoints carry exactly this set), so encoding tokens defaults to it.
    ema   their exponential moving average. The official reconstruction evaluation uses it, so
          ``stage1_tokenizer.evaluate`` and ``convert_official`` default to it.

A Stage-1 run ends by writing both as plain tokenizer checkpoints: ``RUN/final`` (EMA) and ``RUN/final-raw``
(raw). Every tokenizer checkpoint this project writes names its set in its config.json, ``extra["weights"]``
(read by ``shared.token_dataset.provenance.tokenizer_weights``). Plain paths and JSON only: no torch here, so
dataprep can check its arguments before importing it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple, Union

from shared.token_dataset.provenance import TOKENIZER_WEIGHT_SETS, tokenizer_weights

WEIGHT_SETS = TOKENIZER_WEIGHT_SETS
EXPORT_DIRS = {"ema": "final", "raw": "final-raw"}  # RUN/<dir>: where a Stage-1 run exports each set
FOR_TOKENS = "raw"  # the set the official AR recipe encodes its tokens with
KIND = "tokenizer"  # stage1_tokenizer.tokenizer.CHECKPOINT_KIND (that module imports torch)


def _is_tokenizer(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def select(ref: Union[str, Path], weights: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    """The tokenizer checkpoint directory to encode tokens with, and its weight set (None: not recorded).

    ``ref`` is a tokenizer checkpoint directory (taken as it is: ``weights``, when given, must be the set it
    records), a Stage-1 run directory holding ``final/`` and ``final-raw/`` (the ``weights`` set, raw by
    default), or a Stage-2 converter's output holding ``tokenizer/`` (the official AR file's raw set).
    Anything else is returned as it is, for the caller's loader to say what is wrong with it. ValueError
    (one line) when the asked set is not there."""
    if weights is not None and weights not in WEIGHT_SETS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_SETS)}, got {weights!r}")
    path = Path(ref)
    if path.is_dir() and not (path / "config.json").exists():
        if _is_tokenizer(path / KIND):
            path = path / KIND
        elif any((path / d).is_dir() for d in EXPORT_DIRS.values()):  # a Stage-1 run
            want = weights or FOR_TOKENS
            if not _is_tokenizer(path / EXPORT_DIRS[want]):
                other = next(w for w in WEIGHT_SETS if w != want)
                raise ValueError(f"{path} is a Stage-1 run without {EXPORT_DIRS[want]}/, its {want} weights (runs "
                                 f"made before both sets were exported have final/ only, the EMA set): pass "
                                 f"--tokenizer-weights {other} to encode with the {other} set")
            path = path / EXPORT_DIRS[want]
    found = tokenizer_weights(path)
    if weights is not None and found is not None and found != weights:
        raise ValueError(f"{path} holds the {found} weights, not the {weights} ones --tokenizer-weights asks for "
                         f"(a Stage-1 run writes them to RUN/{EXPORT_DIRS[weights]}/)")
    return path, found or weights
