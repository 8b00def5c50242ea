"""Verify a token dataset: every row of both stores against the checksums its manifest records, and the
two stores against each other (same ids, labels, views and token bytes).

    python -m dataprep.inspect_dataset DATASET --verify

What is checked (the manifest's ``commits`` block, ``shared.token_dataset.checksums``, says what was committed):
  * Lance, at the committed version: every data file against its sha256; every row read, each chunk's
    rows against the chunk's ``rows_sha256`` / ``paths_sha256``; row ids, splits and views consistent;
  * MDS, per split: index.json against its sha256 (when it is missing or damaged, the chunk indexes are
    used instead, so the shards can still be checked), every shard file against the sha1 in the index,
    every sample (an image) decoded into its (image, view) rows, each chunk's rows against ``rows_sha256``;
  * across: the ids of each split in both stores, per id the same label, view and tokens, and the row
    counts of the manifest.
A problem names the store, split, file and rows; notes are states that are not damage (a split being
written, debris a killed job left that the next run removes).
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from dataprep import cli
from dataprep import state as st
from shared import token_dataset as td
from shared.progress import progress
from shared.token_dataset import checksums
from shared.token_dataset.writer import chunk_shards

RowDigests = Dict[str, Tuple[bytes, str]]  # row id -> (digest, where it was read: a file or a store)


@dataclass
class Report:
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    rows_checked: Dict[str, int] = field(default_factory=dict)  # per split: rows read in both stores
    store_rows: Dict[str, Dict[str, int]] = field(default_factory=dict)  # per split: rows read per store

    @property
    def ok(self) -> bool:
        return not self.problems


def _ids(ids: Iterable[str], n: int = 6) -> str:
    ids = sorted(ids, key=lambda r: td.parse_row_id(r)[1:] if r.count("-") >= 2 else (0, 0))
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def verify(root: str | Path) -> Report:
    """Check everything; ``ManifestError`` if the manifest itself cannot be read (nothing to check against)."""
    root = Path(root)
    m = td.read_manifest(root)
    rep = Report()
    if m.commits is None:
        rep.problems.append(f"{td.MANIFEST} records no checksums (written before dataprep recorded them): only "
                            "the two stores are compared; encode the dataset again to get them")
    lance = _lance_rows(root, m, rep)
    for split in m.splits:
        mds = _mds_rows(root, split, m, rep)
        _compare(split, m, lance.get(split, {}) if lance is not None else None, mds, rep)
    return rep


# --- Lance ------------------------------------------------------------------------------------------------

def _lance_rows(root: Path, m: td.Manifest, rep: Report) -> Optional[Dict[str, Dict[str, Tuple[bytes, bytes]]]]:
    """{split: {id: (row digest, path digest)}} at the committed version, or None if it cannot be read."""
    import lance

    uri, name = td.lance_uri(root), td.LANCE_DIR
    version = m.lance_version
    if not Path(uri, "_versions").is_dir():
        if any(c.rows for c in m.counts.values()):
            rep.problems.append(f"{name}: missing")
        return None
    try:
        ds = lance.dataset(uri, version=version)
        latest = lance.dataset(uri).version
    except Exception as e:  # whatever stops Lance from opening it is damage to report, not a crash
        rep.problems.append(f"{name}: cannot open version {version}: {cli.first_line(e, with_type=True)}")
        return None
    if version is not None and latest > version:
        _newer_versions(root, version, latest, rep)
    at = f"{name} (version {ds.version})"
    if m.commits is not None:
        want = m.commits["lance_files"]
        have = {f.path for frag in ds.get_fragments() for f in frag.data_files()}
        for f in sorted(set(want) - have):
            rep.problems.append(f"{at}: reads no data file {f}, which the manifest records")
        for f in sorted(have - set(want)):
            rep.problems.append(f"{at}: reads data file {f}, which the manifest does not record")
        for f in sorted(have & set(want)):
            path = Path(uri, "data", f)
            if not path.is_file():
                rep.problems.append(f"{name}/data/{f}: missing")
            elif checksums.sha256_file(path) != want[f]:
                rep.problems.append(f"{name}/data/{f}: sha256 differs from the manifest (damaged)")
    rows: Dict[str, Dict[str, Tuple[bytes, bytes]]] = {s: {} for s in m.splits}
    bad: List[str] = []
    bar = progress(desc=f"verify {name}", total=sum(c.rows for c in m.counts.values()), unit="row")
    try:
        for batch in ds.to_batches(columns=["id", "split", "path", "label", "view", "tokens"]):
            bar.update(batch.num_rows)
            cols = [batch.column(c).to_pylist() for c in ("id", "split", "path", "label", "view", "tokens")]
            for rid, split, path, label, view, tokens in zip(*cols):
                try:
                    s, _, v = td.parse_row_id(rid)
                except ValueError:
                    s, v = None, None
                if s != split or v != view or split not in rows:
                    bad.append(f"{rid!r} (split {split!r}, view {view})")
                    continue
                if rid in rows[split]:
                    bad.append(f"{rid!r} (twice)")
                rows[split][rid] = (checksums.row_digest(rid, label, view, tokens), checksums.path_digest(rid, path))
    except Exception as e:  # a damaged file can stop the scan itself
        rep.problems.append(f"{at}: cannot read its rows: {cli.first_line(e, with_type=True)}")
        return None
    bar.close()
    if bad:
        rep.problems.append(f"{at}: {len(bad)} rows whose id, split or view do not agree: {', '.join(bad[:6])}")
    return rows


def _newer_versions(root: Path, version: int, latest: int, rep: Report) -> None:
    """Versions past the committed one: a writer's uncommitted work (a note) or changes from outside."""
    newer = f"version {latest} is" if latest == version + 1 else f"versions {version + 1}..{latest} are"
    span = f"{td.LANCE_DIR}: {newer} newer than the committed version {version}"
    holder = st.writer_of(root)
    try:
        state = st.State.load(root)
    except st.ProvenanceError:
        state = None
    in_progress = state is not None and any(not r["complete"] for r in state.data["splits"].values())
    if holder:
        rep.notes.append(f"{span}: the dataset is being written ({holder}); readers use version {version}")
    elif in_progress:
        rep.notes.append(f"{span}: a split was started and not finished (rows of an interrupted job); readers "
                         f"use version {version}, running its encode command again finishes or rolls them back")
    else:
        rep.problems.append(f"{span} and no split is being written: changes made outside dataprep (rows dropped "
                            f"or added?); readers use version {version}, the next encode run rolls them back")


# --- MDS --------------------------------------------------------------------------------------------------

def _mds_rows(root: Path, split: str, m: td.Manifest, rep: Report) -> RowDigests:
    """{id: (digest, shard file)} of every sample that could be read."""
    base = td.mds_split_dir(root, split)
    rel = f"{td.MDS_DIR}/{split}"
    rec = m.commits["splits"][split] if m.commits is not None else None
    shards: Optional[List[Dict[str, Any]]] = None
    index = base / "index.json"
    if m.counts[split].complete:
        if not index.is_file():
            rep.problems.append(f"{rel}/index.json: missing (Streaming cannot read the split)")
        elif rec is not None and checksums.sha256_file(index) != rec["mds_index_sha256"]:
            rep.problems.append(f"{rel}/index.json: sha256 differs from the manifest (damaged or replaced)")
        else:
            try:
                shards = json.loads(index.read_text())["shards"]
            except (ValueError, KeyError, TypeError) as e:
                rep.problems.append(f"{rel}/index.json: not a Streaming index ({cli.first_line(e, with_type=True)})")
    if shards is None and rec is not None:  # from the chunk indexes: the shards can still be checked
        shards = []
        for ch in rec["chunks"]:
            cdir = td.chunk_dir_name(ch["chunk"])
            cindex = base / cdir / "index.json"
            if not cindex.is_file():
                rep.problems.append(f"{rel}/{cdir}/index.json: missing (chunk {ch['chunk']}, {ch['rows']} rows)")
                continue
            if checksums.sha256_file(cindex) != ch["mds_index_sha256"]:
                rep.problems.append(f"{rel}/{cdir}/index.json: sha256 differs from the manifest (damaged)")
            try:
                shards += chunk_shards(root, split, ch["chunk"])
            except (ValueError, KeyError, TypeError) as e:
                rep.problems.append(f"{rel}/{cdir}/index.json: not a Streaming index "
                                    f"({cli.first_line(e, with_type=True)})")
    if rec is not None:
        recorded = {td.chunk_dir_name(ch["chunk"]) for ch in rec["chunks"]}
        stray = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in recorded) if base.is_dir() else []
        if stray:
            rep.notes.append(f"{rel}: directories no commit recorded (a killed job's, removed by the next run): "
                             f"{', '.join(stray)}")
    rows: RowDigests = {}
    for shard in progress(shards or [], desc=f"verify {rel}", unit="shard"):
        _read_shard(base, rel, shard, m.commits is not None, m.packing.bytes_per_image, len(m.views), rows, rep)
    return rows


def _read_shard(base: Path, rel: str, shard: Dict[str, Any], want_hash: bool, bytes_per_image: int, views: int,
                rows: RowDigests, rep: Report) -> None:
    """Add the (image, view) rows of one shard's samples (``td.mds_rows``) to ``rows``."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    info = shard.get("zip_data") or shard["raw_data"]
    name = f"{rel}/{info['basename']}"
    f = base / info["basename"]
    if not f.is_file():
        n = int(shard["samples"])
        rep.problems.append(f"{name}: missing ({n} images: {n * views} rows)")
        return
    data = f.read_bytes()
    digest = info.get("hashes", {}).get(td.MDS_HASH)
    if digest is None:
        if want_hash:
            rep.problems.append(f"{name}: index.json records no {td.MDS_HASH} for it")
    elif hashlib.new(td.MDS_HASH, data).hexdigest() != digest or len(data) != info["bytes"]:
        rep.problems.append(f"{name}: {td.MDS_HASH} differs from index.json (damaged)")
    try:
        raw = decompress(shard["compression"], data) if shard.get("zip_data") else data
        reader = reader_from_json(str(base), None, shard)
        n = int(shard["samples"])
        offsets = np.frombuffer(raw, np.uint32, count=n + 1, offset=4)
        for i in range(n):
            for rid, label, view, tokens in td.mds_rows(reader.decode_sample(raw[offsets[i]:offsets[i + 1]]),
                                                        bytes_per_image):
                rows[rid] = (checksums.row_digest(rid, label, view, tokens), name)
    except Exception as e:  # a damaged shard may not decompress or parse: report it, check the rest
        rep.problems.append(f"{name}: cannot be decoded ({cli.first_line(e, with_type=True)})")


# --- both -------------------------------------------------------------------------------------------------

def _by_chunk(rows: Optional[Dict[str, Any]],
              chunks: List[Dict[str, Any]]) -> Tuple[Dict[int, Dict[str, Any]], List[str]]:
    """Rows grouped by the recorded chunk holding their image, and the ids no chunk holds."""
    spans = sorted((ch["first"], ch["first"] + ch["images"], ch["chunk"]) for ch in chunks)
    starts = [a for a, _, _ in spans]
    out: Dict[int, Dict[str, Any]] = {ch["chunk"]: {} for ch in chunks}
    extra = []
    for rid, d in (rows or {}).items():
        index = td.parse_row_id(rid)[1]
        k = bisect.bisect_right(starts, index) - 1
        if k >= 0 and index < spans[k][1]:
            out[spans[k][2]][rid] = d
        else:
            extra.append(rid)
    return out, extra


def _compare(split: str, m: td.Manifest, lance: Optional[Dict[str, Tuple[bytes, bytes]]], mds: RowDigests,
             rep: Report) -> None:
    lance_name = f"{td.LANCE_DIR} (version {m.lance_version})" if m.lance_version else td.LANCE_DIR
    mds_name = f"{td.MDS_DIR}/{split}"
    check_mds = m.counts[split].complete  # an unfinished split has no index: Streaming cannot read it yet
    rec = m.commits["splits"][split] if m.commits is not None else None
    if rec is not None:
        lance_chunks, lance_extra = _by_chunk(lance, rec["chunks"])
        mds_chunks, mds_extra = _by_chunk(mds, rec["chunks"])
        for ch in rec["chunks"]:
            where = f"split {split!r} chunk {ch['chunk']} (images {ch['first']}..{ch['first'] + ch['images'] - 1})"
            lc, mc = (lance_chunks[ch["chunk"]] if lance is not None else None), mds_chunks[ch["chunk"]]
            m_ok = checksums.chunk_digest({r: d for r, (d, _) in mc.items()}) == ch["rows_sha256"]
            l_ok = lc is not None and checksums.chunk_digest({r: d for r, (d, _) in lc.items()}) == ch["rows_sha256"]
            if lc is not None and not l_ok:
                rep.problems.append(f"{lance_name}: {where} differs from its checksum; "
                                    + _diff(lc, mc if m_ok else None, ch["rows"])[0])
            elif l_ok and checksums.chunk_digest({r: p for r, (_, p) in lc.items()}) != ch["paths_sha256"]:
                rep.problems.append(f"{lance_name}: {where}: the path column differs from its checksum")
            if check_mds and not m_ok:
                text, wrong = _diff(mc, lc if l_ok else None, ch["rows"])
                files = sorted({mc[r][1] for r in wrong if r in mc})
                rep.problems.append(f"{mds_name}: {where} differs from its checksum; {text}"
                                    + (f" (in {', '.join(files)})" if files else ""))
        for store, extra in ((lance_name, lance_extra), (mds_name, mds_extra if check_mds else [])):
            if extra:
                rep.problems.append(f"{store}: {len(extra)} rows of split {split!r} in no committed chunk: "
                                    f"{_ids(extra)}")
    if lance is not None and check_mds:
        only_l, only_m = set(lance) - set(mds), set(mds) - set(lance)
        differ = [r for r in set(lance) & set(mds) if lance[r][0] != mds[r][0]]
        if only_l or only_m or differ:
            parts = [f"{what} {len(ids)}: {_ids(ids)}" for what, ids in
                     (("only in Lance", only_l), ("only in MDS", only_m), ("different label/view/tokens", differ))
                     if ids]
            rep.problems.append(f"split {split!r}: the two stores disagree ({'; '.join(parts)})")
    for store, rows in ((lance_name, lance), (mds_name, mds if check_mds else None)):
        if rows is not None and len(rows) != m.counts[split].rows:
            rep.problems.append(f"{store}: split {split!r} has {len(rows)} rows, the manifest counts "
                                f"{m.counts[split].rows}")
    rep.rows_checked[split] = len(lance or {}) + (len(mds) if check_mds else 0)
    rep.store_rows[split] = {"Lance": len(lance or {}), **({"MDS": len(mds)} if check_mds else {})}


def _diff(rows: RowDigests, reference: Optional[RowDigests], expected: int) -> Tuple[str, List[str]]:
    """Which rows differ (text, ids), named against the other store when that one matches its checksum."""
    if reference is None:
        return f"{len(rows)} rows read, {expected} committed (the other store cannot tell which rows are wrong)", []
    missing = set(reference) - set(rows)
    extra = set(rows) - set(reference)
    changed = {r for r in set(rows) & set(reference) if rows[r][0] != reference[r][0]}
    parts = [f"{what}: {_ids(ids)}" for what, ids in (("rows missing", missing), ("rows changed", changed),
                                                      ("rows not committed", extra)) if ids]
    return "; ".join(parts) or "same rows as the other store", sorted(changed | extra)
