"""Command-line plumbing of the dataprep tools: every refusal is one ``error: ...`` line on stderr.

argparse's own refusals print the usage and then ``prog: error: ...``; these print one line (exit 2, as
argparse does), and the number types below refuse negative, zero or non-finite values where they make
no sense before anything is read or written.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def first_line(e: BaseException, with_type: bool = False, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters (messages of Ray, Lance and Arrow run long)."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:limit]
    if with_type or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text
