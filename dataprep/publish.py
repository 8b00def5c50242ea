"""Publish a finished token dataset to object storage, atomically for readers and resumably.

    python -m dataprep.publish DATASET s3://bucket/prefix [--s3-endpoint-url URL] [--overwrite]

(``dataprep/encode.py --out s3://...`` encodes into a local staging directory and ends with this step.)

Readers open manifest.json first and nothing else without it, so the manifest is the last object written:
until it exists the prefix holds no dataset (``TokenDataset`` and Stage 2 say "manifest.json is missing"),
and once it exists every object it refers to is there. The protocol:

  0. the local dataset is verified against the checksums its manifest records (``dataprep/verify.py``),
     once the target has passed its read-only checks; a damaged one (a missing shard, a changed byte) is
     refused before anything is written remotely;
  1. a marker ``.publishing.json`` naming the dataset (its ``created`` time and manifest digest) is written,
     so a second run knows the objects under the prefix are its own;
  2. every file of the dataset (the Lance table up to its committed version, the recorded MDS chunks and
     split indexes, the failure lists; not the writer's state or lock) is uploaded with its sha256 in the
     object metadata; a rerun after a kill skips the objects already there with the same digest;
  3. manifest.json is written;
  4. objects of an earlier publication of the same dataset that the new manifest no longer uses (Lance
     files a compaction replaced) are deleted, then the marker.

Publishing again after a later split was encoded updates the dataset in place: readers keep the previous
manifest, whose objects stay, until the new one is written. A prefix that holds anything else (another
dataset, objects this tool did not write) is refused; ``--overwrite`` replaces another dataset (its
manifest goes first, so no reader sees a mix). Credentials: the standard AWS environment or profile
(``shared.object_store``); none is written anywhere.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from dataprep import cli
from dataprep import state as st
from shared import atomic
from shared import object_store as store
from shared import token_dataset as td
from shared.progress import progress
from shared.token_dataset.checksums import sha256_file

MARKER = ".publishing.json"
UPLOAD_THREADS = 8
SHA_KEY = "sha256"  # x-amz-meta-sha256 of every uploaded object
OWNED_PREFIXES = (td.LANCE_DIR + "/", td.MDS_DIR + "/", "failures-")  # what a publication may delete


class PublishError(RuntimeError):
    """A dataset that cannot be published, or a target that must not be written; one line."""


def dataset_files(root: Path, manifest: td.Manifest) -> List[str]:
    """The files readers need, relative to ``root``: Lance, the recorded MDS chunks and split indexes,
    the failure lists. Refuses a dataset with a split still being written."""
    unfinished = [s for s, c in manifest.counts.items() if not c.complete]
    if unfinished:
        raise PublishError(f"{root}: split {unfinished[0]!r} is not complete (run its encode job to the end "
                           "first)")
    writer = st.writer_of(root)
    if writer:
        raise PublishError(f"{root} is being written by another job ({writer}); publish it when that ends")
    files = _committed_lance_files(root, manifest.lance_version)
    for split in manifest.splits:
        mds = td.mds_split_dir(root, split)
        files.append(str((mds / "index.json").relative_to(root)))
        chunks = manifest.commits["splits"][split]["chunks"] if manifest.commits else None
        dirs = ([mds / td.chunk_dir_name(c["chunk"]) for c in chunks] if chunks is not None
                else [p for p in mds.iterdir() if p.is_dir() and p.name.startswith("chunk-")])
        for d in dirs:
            files += sorted(str(p.relative_to(root)) for p in d.rglob("*") if p.is_file())
        failures = root / f"failures-{split}.tsv"
        if failures.is_file():
            files.append(failures.name)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise PublishError(f"{root}: {missing[0]} is missing (run dataprep.inspect_dataset --verify)")
    # Lance's version manifests after its data files, so a listing never shows a version before its data
    return sorted(files, key=lambda f: ("/_versions/" in f, f))


def _version_of(name: str) -> int:
    """The Lance version a ``_versions/*.manifest`` file holds (both of Lance's naming schemes: the
    version itself, or 2^64 - 1 minus it so that listings show the newest first)."""
    n = int(name.split(".")[0])
    return (1 << 64) - 1 - n if n >= 1 << 63 else n


def _committed_lance_files(root: Path, version: Optional[int]) -> List[str]:
    """The Lance files of the versions up to the committed one, relative to ``root``: a later version is a
    writer's uncommitted work (a killed split's rows) that no reader may see, so neither its version file,
    its transaction nor the data files only it reads are published."""
    lance_dir = root / td.LANCE_DIR
    if version is None or not lance_dir.is_dir():
        return []
    newer_data: set = set()
    latest = max((_version_of(p.name) for p in (lance_dir / "_versions").glob("*.manifest")), default=version)
    if latest > version:
        import lance

        def data_of(v: int) -> set:
            return {f.path for frag in lance.dataset(str(lance_dir), version=v).get_fragments()
                    for f in frag.data_files()}
        newer_data = set().union(*(data_of(v) for v in range(version + 1, latest + 1))) - data_of(version)

    def committed(rel: Path) -> bool:
        top, name = rel.parts[0], rel.name
        if top == "_versions":
            return _version_of(name) <= version if name.endswith(".manifest") else latest == version
        if top == "_transactions":  # READ_VERSION-UUID.txn made version READ_VERSION + 1
            return int(name.split("-")[0]) < version
        return not (top == "data" and name in newer_data)
    return sorted(str(p.relative_to(root)) for p in lance_dir.rglob("*")
                  if p.is_file() and committed(p.relative_to(lance_dir)))


def verify_local(root: Path) -> None:
    """Every file of ``root`` against the checksums its manifest records (``dataprep/verify.py``, what
    ``inspect_dataset --verify`` runs); PublishError naming the first problem when anything is damaged."""
    from dataprep import verify

    rep = verify.verify(root)
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more problems)" if len(rep.problems) > 1 else ""
        raise PublishError(f"{root} is damaged, nothing was published: {rep.problems[0]}{more}; "
                           "run dataprep.inspect_dataset --verify for the full report")


def _created_of(manifest_bytes: bytes) -> Optional[str]:
    try:
        return json.loads(manifest_bytes.decode("utf-8")).get("created")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None


def _remote_manifest(uri: str) -> Tuple[Optional[bytes], Optional[dict]]:
    data = store.get_bytes(store.join(uri, td.MANIFEST))
    if data is None:
        return None, None
    try:
        return data, json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data, {}


def check_target(uri: str, created: Optional[str], overwrite: bool = False) -> Tuple[Optional[bytes], Dict[str, int]]:
    """Whether ``uri`` may receive the dataset created at ``created`` (None: one not created yet); returns
    the manifest there (or None) and {key: size} of the objects under it. PublishError when it holds
    another dataset, another one's unfinished publication, or objects this tool did not write (unless
    ``overwrite``); StoreError for a missing bucket or refused credentials."""
    store.check_bucket(uri)
    existing = dict(store.list_objects(uri))
    have, theirs = _remote_manifest(uri)
    marker = store.get_bytes(store.join(uri, MARKER)) if MARKER in existing else None
    try:
        marker_created = json.loads(marker).get("created") if marker else None
    except ValueError:
        marker_created = None
    if overwrite:
        return have, existing
    where = store.redact(uri)
    if have is not None:
        if created is None or (theirs or {}).get("created") != created:
            what = "a token dataset" if created is None else "another token dataset"
            raise PublishError(f"{where} holds {what} (created {(theirs or {}).get('created')}) that this one is not "
                               "an update of; pass --overwrite to replace it, or choose another prefix")
    elif marker is not None:
        if created is not None and marker_created != created:
            raise PublishError(f"{where} holds an unfinished publication of another dataset (created "
                               f"{marker_created}); pass --overwrite to replace it, or choose another prefix")
    elif existing:
        raise PublishError(f"{where} holds {len(existing)} objects that are not a dataset this tool published "
                           f"(e.g. {sorted(existing)[0]}); choose an empty prefix, or pass --overwrite")
    return have, existing


def publish(root: Path, uri: str, *, overwrite: bool = False, crash_after: Optional[int] = None,
            log=print) -> Dict[str, int]:
    """Upload ``root`` to ``uri``; returns counts {uploaded, skipped, deleted}."""
    root = Path(root)
    try:
        manifest = td.read_manifest(root)
    except td.ManifestError as e:
        raise PublishError(str(e)) from None
    local_bytes = (root / td.MANIFEST).read_bytes()
    files = dataset_files(root, manifest)
    store.split_uri(uri)
    ident = {"created": manifest.created, "manifest_sha256": hashlib.sha256(local_bytes).hexdigest()}

    have, existing = check_target(uri, manifest.created, overwrite)
    if have is not None and have == local_bytes and MARKER not in existing:
        log(f"{store.redact(uri)} already holds this dataset, published: nothing to do")
        return {"uploaded": 0, "skipped": len(files), "deleted": 0}
    verify_local(root)  # after the target's (read-only) checks, before anything is written there
    if have is not None and _created_of(have) != manifest.created:  # --overwrite another one
        store.delete([store.join(uri, td.MANIFEST)])  # readers stop seeing the old dataset first
    store.put_bytes(store.join(uri, MARKER), json.dumps(ident).encode())

    def put(rel: str) -> bool:
        """Upload one file unless the same bytes are there already; True when uploaded."""
        path = root / rel
        digest = sha256_file(path)
        target = store.join(uri, rel)
        if rel in existing and existing[rel] == path.stat().st_size:
            meta = store.head(target)
            if meta is not None and meta.get("Metadata", {}).get(SHA_KEY) == digest:
                return False
        with atomic.disk_full_as_error(store.redact(target)):  # a store out of space: one line, no manifest
            store.upload_file(str(path), target, metadata={SHA_KEY: digest})
        return True

    uploaded = skipped = 0
    # Lance's data files, MDS shards, indexes in parallel (object stores reward concurrency); Lance's
    # version files only after all of them
    groups = [[f for f in files if "/_versions/" not in f], [f for f in files if "/_versions/" in f]]
    for group in groups:
        if crash_after is not None:  # tests: a kill before the manifest, after exactly crash_after uploads
            for rel in group:
                if put(rel):
                    uploaded += 1
                    if uploaded == crash_after:
                        os._exit(17)
                else:
                    skipped += 1
            continue
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            for done in progress(pool.map(put, group), total=len(group), unit="file",
                                 desc="publish versions" if group is groups[1] else "publish files"):
                uploaded, skipped = uploaded + done, skipped + (not done)
    store.put_bytes(store.join(uri, td.MANIFEST), local_bytes, metadata={SHA_KEY: ident["manifest_sha256"]})
    keep = set(files) | {td.MANIFEST, MARKER}
    stale = [k for k in existing if k not in keep and k.startswith(OWNED_PREFIXES)]
    store.delete([store.join(uri, k) for k in stale])
    store.delete([store.join(uri, MARKER)])
    log(f"published {root} to {store.redact(uri)}: {uploaded} objects uploaded, {skipped} already there, "
        f"{len(stale)} stale removed; manifest written last")
    return {"uploaded": uploaded, "skipped": skipped, "deleted": len(stale)}


def main(argv: Optional[List[str]] = None) -> int:
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="a finished local dataset directory (dataprep/encode.py --out)")
    p.add_argument("target", help="s3://bucket/prefix")
    p.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3, "
                                             "AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--overwrite", action="store_true", help="replace another dataset or foreign objects there")
    p.add_argument("--_crash-after", dest="crash_after", type=int, help=argparse.SUPPRESS)  # tests only
    args = p.parse_args(argv)
    if not store.is_s3(args.target):
        p.error(f"target: expected s3://BUCKET/PREFIX, got {args.target!r}")
    try:
        store.configure(args.s3_endpoint_url)
        publish(Path(args.dataset), args.target, overwrite=args.overwrite, crash_after=args.crash_after)
    except (PublishError, store.StoreError, atomic.DiskFullError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
