"""Where a dataset's tokens come from: the code version that wrote them, and which tokenizer checkpoint
made (and so decodes) them, with its weight set. Stage 2 records the tokenizer in its checkpoints and checks
the tokenizer it decodes samples with (comparing bit counts only let a different tokenizer decode garbage).

A tokenizer has two weight sets: ``raw`` (the generator's own weights: the official AR recipe encodes its
tokens with them) and ``ema`` (their moving average: the official reconstruction evaluation uses it). A
tokenizer checkpoint says which one it holds in its config.json, ``extra["weights"]`` (``tokenizer_weights``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from shared.token_dataset.checksums import checkpoint_sha256
from shared.token_dataset.layout import ManifestError, PathOrUri

if TYPE_CHECKING:
    from shared.token_dataset.manifest import Manifest

CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout this package is part of
TOKENIZER_WEIGHT_SETS = ("raw", "ema")  # a tokenizer checkpoint's extra["weights"]
_SET_NAMES = {"raw": "raw", "ema": "EMA"}


def code_version(commit: Optional[str] = None) -> str:
    """Package version plus the git commit: ``commit`` when given (a job whose uploaded code has no .git
    passes it along), else read from the checkout's .git (files only, no subprocess)."""
    from importlib import metadata

    try:
        version = metadata.version("open-magvit2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = commit or git_commit()
    return f"{version}+{commit}" if commit else version


def git_commit(repo: Path = CODE_ROOT) -> Optional[str]:
    """The abbreviated commit checked out in ``repo`` (loose or packed ref, or a worktree's .git file)."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (repo / git.read_text().strip().partition("gitdir: ")[2]).resolve()
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            common = git / "commondir"
            roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
            head = next((f.read_text().strip() for f in (r / ref for r in roots) if f.is_file()), "")
            if not head:
                packed = [ln.split() for r in roots if (r / "packed-refs").is_file()
                          for ln in (r / "packed-refs").read_text().splitlines() if not ln.startswith(("#", "^"))]
                head = next((h for h, *name in packed if name == [ref]), "")
    except OSError:
        return None
    return head[:12] if re.fullmatch(r"[0-9a-f]{40,64}", head) else None


# --- tokenizer identity -----------------------------------------------------------------------------------

def tokenizer_weights(ckpt_dir: PathOrUri) -> Optional[str]:
    """The weight set (``TOKENIZER_WEIGHT_SETS``) a tokenizer checkpoint says it holds: its config.json's
    ``extra["weights"]``, or ``extra["source"] == "ema"`` (Stage-1 exports from before the field); None when
    it does not say (or cannot be read: loading it tells why)."""
    try:
        extra = json.loads((Path(ckpt_dir) / "config.json").read_text()).get("extra")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(extra, dict):
        return None
    found = extra.get("weights", "ema" if extra.get("source") == "ema" else None)
    return found if found in TOKENIZER_WEIGHT_SETS else None


def tokenizer_identity(ckpt_dir: PathOrUri, config: Mapping[str, Any], weights: Optional[str] = None,
                       source: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The manifest's ``tokenizer`` block for the checkpoint in ``ckpt_dir`` (its ``config``): what a
    producer records, and what ``tokens_record`` later checks decoders against. ``weights``: the weight set,
    when the checkpoint does not record it itself (``tokenizer_weights``); left out when neither says.
    ``source``: where the checkpoint came from, the model reference it was resolved from
    (``shared.model_ref.Resolved.record()``: the reference as given, directory / official file / Hub file,
    sha256, Hub repo, file, revision and commit); left out when not given."""
    identity = {"preset": config.get("preset", "custom"), "config": config,
                "checkpoint_sha256": checkpoint_sha256(ckpt_dir)}
    weights = tokenizer_weights(ckpt_dir) or weights
    if weights:
        identity["weights"] = weights
    return {**identity, "source": dict(source)} if source else identity


def tokens_record(manifest: "Manifest") -> Dict[str, Any]:
    """What a model trained on ``manifest``'s tokens keeps about them (``stage2_ar.train`` stores it as its
    checkpoints' ``extra["tokens"]``), so the tokenizer decoding its samples can be checked later."""
    tok = manifest.tokenizer
    return {"tokenizer_sha256": tok["checkpoint_sha256"], "tokenizer_preset": tok["preset"],
            "tokenizer_weights": tok.get("weights"), "tokenizer_path": manifest.tokenizer_path,
            "grid": list(manifest.grid), "resolution": manifest.resolution}


def tokenizer_mismatch(record: Mapping[str, Any], tokenizer_dir: PathOrUri,
                       downsample_factor: Optional[int] = None) -> List[str]:
    """Why the tokenizer checkpoint in ``tokenizer_dir`` is not the one the tokens of ``record``
    (``tokens_record``) were encoded with; empty when it is: the sha256 of its weights must be the recorded
    one (named as the other weight set when both record theirs and they differ), and its
    ``downsample_factor`` (if given) must turn the recorded resolution into the recorded grid."""
    problems = []
    want = record.get("tokenizer_sha256")
    have = checkpoint_sha256(tokenizer_dir)
    if want and have != want:
        where = f" at {record['tokenizer_path']}" if record.get("tokenizer_path") else ""
        made = f"sha256 {want[:12]}..., preset {record.get('tokenizer_preset')!r}{where}"
        used, this = record.get("tokenizer_weights"), tokenizer_weights(tokenizer_dir)
        if used in _SET_NAMES and this in _SET_NAMES and used != this:
            problems.append(f"the tokens were encoded with the {_SET_NAMES[used]} weights ({made}), this is the "
                            f"{_SET_NAMES[this]} set (sha256 {have[:12]}...): decode with the {_SET_NAMES[used]} "
                            f"set of that tokenizer")
        else:
            problems.append(f"its weights (sha256 {have[:12]}...) are not those the tokens were encoded with ({made})")
    res, grid = record.get("resolution"), record.get("grid")
    if downsample_factor and res and grid and [res // downsample_factor] * 2 != list(grid):
        problems.append(f"its {downsample_factor}x downsampling gives a {res // downsample_factor}x"
                        f"{res // downsample_factor} grid at {res} px, the tokens are {grid[0]}x{grid[1]}")
    return problems


def check_tokenizer(record: Mapping[str, Any], tokenizer_dir: PathOrUri, *, downsample_factor: Optional[int] = None,
                    allow: Optional[str] = None) -> None:
    """Refuse (ManifestError) a tokenizer checkpoint that ``tokenizer_mismatch`` finds problems with.
    ``allow`` names the caller's switch for a deliberate swap, if it has one."""
    problems = tokenizer_mismatch(record, tokenizer_dir, downsample_factor)
    if problems:
        swap = f" (pass {allow} to use it anyway)" if allow else ""
        raise ManifestError(f"tokenizer {tokenizer_dir} does not match the token dataset: {'; '.join(problems)}; "
                            f"it would decode the tokens into wrong images{swap}")
