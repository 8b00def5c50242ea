"""What the job does to the two stores beyond writing rows (``shared.token_dataset.writer`` writes them):
roll Lance back to the committed version, compact it and drop old versions; remove MDS chunk directories
no commit recorded.
"""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Sequence

from shared import token_dataset as td
from shared.token_dataset.writer import append_lance


class LanceStore:
    """The append-per-chunk Lance table of a dataset, with rollback to the last recorded version."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = td.lance_uri(root)

    def exists(self) -> bool:
        return Path(self.uri, "_versions").is_dir()

    def dataset(self, version: Optional[int] = None):
        import lance

        return lance.dataset(self.uri, version=version)

    def append(self, table) -> int:
        return append_lance(self.root, table)

    def rollback(self, version: Optional[int]) -> bool:
        """Make ``version`` the latest again (None: no committed rows, remove the table). True if changed."""
        if version is None:
            if Path(self.uri).exists():
                shutil.rmtree(self.uri)
                return True
            return False
        latest = self.dataset().version
        if latest == version:
            return False
        if latest < version:
            raise RuntimeError(f"{self.uri} is at version {latest}, older than the recorded {version}")
        self.dataset(version).restore()
        return True

    def compact(self) -> int:
        """Merge the per-chunk fragments into large files; returns the new version."""
        ds = self.dataset()
        if len(ds.get_fragments()) > 1:
            ds.optimize.compact_files(target_rows_per_fragment=1 << 20)
        return self.dataset().version

    def cleanup(self) -> None:
        """Drop old versions and unreferenced files (debris of interrupted appends) to save disk."""
        self.dataset().cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True)


def remove_stray_mds(root: Path, split: str, committed: Sequence[int]) -> List[str]:
    """Delete chunk directories (and temp dirs) that the state does not list as committed."""
    base = td.mds_split_dir(root, split)
    keep = {td.chunk_dir_name(c) for c in committed}
    removed = []
    if base.is_dir():
        for p in base.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p)
                removed.append(p.name)
    return removed
