"""The command-line arguments shared by ``stage2_ar.sample`` and ``stage2_ar.evaluate``: argparse only, so
their ``--help`` and argument errors answer before torch is imported."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--ckpt, --tokenizer, --allow-tokenizer-mismatch: the models of stage2_ar.sample and stage2_ar.evaluate."""
    p.add_argument("--ckpt", required=required, metavar="REF",
                   help="AR model: checkpoint directory, official .ckpt or hf://ORG/REPO[/FILE][@REV]")
    p.add_argument("--tokenizer", default=None, metavar="REF",
                   help="tokenizer that made the AR model's tokens (a reference as --ckpt; default: the tokenizer "
                        "half of --ckpt: an official AR file's, or OUT/tokenizer of a converter's OUT)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="decode with --tokenizer even if it is not the tokenizer of the AR model's token dataset")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--cfg, --temperature, --top-k, --top-p: one value for all sub-tokens or one per sub-token."""
    p.add_argument("--cfg", default=None,
                   help="CFG scale(s), one or one per sub-token; a sub-token is guided where its scale is > 1 "
                        "(default: the checkpoint's)")
    p.add_argument("--temperature", default=None,
                   help="temperature(s) >= 0, one or one per sub-token (0: argmax; default: the checkpoint's)")
    p.add_argument("--top-k", default=None, help="keep the k most likely sub-tokens, one or one per sub-token (0: off)")
    p.add_argument("--top-p", default=None, help="nucleus mass in (0, 1], one or one per sub-token (1: off)")
