"""The token-dataset contract: the one package that knows what a token dataset on disk is.

dataprep writes datasets through it, Stage 2, the experiments and ``TokenDataset`` read them through it,
and tests make their synthetic datasets with the same writer (``writer.write_dataset``), so there is no
second definition.

    DATASET/manifest.json            what the tokens are; validated by ``read_manifest`` (schema below)
    DATASET/tokens.lance/            Lance table, one row per (image, view): LANCE_COLUMNS
    DATASET/mds/<split>/             MosaicML Streaming shards in chunk-NNNNN/ sub-directories joined by
                                     mds/<split>/index.json: one sample per image (MDS_COLUMNS, zstd)

An MDS sample is an image: ``id`` (``image_id``), ``label`` and ``tokens``, the packed rows of all its
views concatenated in ``views`` order (V x bytes_per_image). Training then sees every image once per
epoch, with one of its views (Stage 2 picks it), as the official recipe's on-the-fly augmentation does;
one sample per (image, view) would make an epoch V passes over the images. ``mds_rows`` expands a
sample back into the (image, view) rows the Lance table holds.

Manifest (format ``open-magvit2-tokens``, version 3): ``packing`` (everything needed to turn a row's
``tokens`` bytes back into indices, see ``Packing``), ``bits_per_token``, ``bit_order`` (how LFQ channels
map to index bits), ``subtoken_bits``, ``grid``, ``tokens_per_image``, ``classes``/``num_classes``,
``resolution``, ``views`` (a row's ``view`` is the position in this list), ``tokenizer`` {preset, config,
checkpoint_sha256, weights (raw or ema; absent when the checkpoint did not say), source (the model reference
it was resolved from, ``shared.model_ref``; absent in older manifests)}, ``counts`` per split {images, encoded_images, failed_images, rows, per_class,
complete}, ``failures``, ``stores`` (paths and column types), ``created``, ``updated``, ``code_version``,
``tokenizer_path`` (a hint, may be null), and ``commits`` (what was committed, with checksums: see
``checksums``; a manifest without it is read, with nothing to check against), and ``sources`` (optional, per
split: the URI and format its images were read from, a shard format's shards with their size, ETag or mtime and
record count, and where the class names came from; ``manifest.check_sources``). Older versions are refused
(re-encode them): 1 had no packing block, 2 had one MDS sample per (image, view).

Readers open the Lance table at ``commits.lance_version``: rows a writer appended after the manifest was
written (a split being encoded, a killed job's debris) are not part of the dataset.

Row sizes (measured with pylance 14 / streaming 0.13, 20k rows of 256 uniformly random 18-bit tokens,
sorted ImageNet-like paths): tokens as fixed_size_binary(576) with zstd in the mini-block layout 577.3 B,
id 2.7 B, path 5.0 B, label + view + split 0.4 B: 585 B = 2.29 B/token. A variable-size binary column
would add 8 B/row of offsets (Lance format 2.0) or skip compression (2.1 full-zip layout), hence the fixed
size.

Modules: ``layout`` (names, constants, ids, paths), ``packing`` (row bytes, rows <-> MDS samples),
``manifest`` (schema, validation, the one reader and writer of manifest.json, producer settings),
``checksums`` (the ``commits`` block's digests), ``writer`` (MDS and Lance writing, ``write_dataset``),
``reader`` (``TokenDataset``, ``TokenStream``), ``provenance`` (code version, tokenizer identity), ``shm``
(Streaming's stale shared memory). This package exports what readers need; writers import
``shared.token_dataset.writer`` and ``.checksums`` explicitly.
"""
from shared.token_dataset.layout import (BIT_ORDER, FORMAT, LANCE_COLUMNS, LANCE_DIR, MANIFEST, MDS_COLUMNS, MDS_DIR,
                                         MDS_HASH, PROVENANCE_KEY, VERSION, ManifestError, PathOrUri,
                                         check_split_name, chunk_dir_name, dataset_uri, image_id, is_remote, lance_uri,
                                         mds_split_dir, parse_image_id, parse_row_id, row_id)
from shared.token_dataset.manifest import Manifest, SplitCounts, read_manifest
from shared.token_dataset.packing import Packing, mds_rows
from shared.token_dataset.provenance import check_tokenizer, tokens_record
from shared.token_dataset.shm import clean_stale_streaming_shm

# Imported on first use: shared.token_dataset.reader imports Streaming (and with it torch), which the Ray
# decode tasks and dataprep's argument checks, importing this package for ids and names, should not pay for.
_READER = ("TokenDataset", "TokenStream", "open_lance")

__all__ = ["BIT_ORDER", "FORMAT", "LANCE_COLUMNS", "LANCE_DIR", "MANIFEST", "MDS_COLUMNS", "MDS_DIR", "MDS_HASH",
           "PROVENANCE_KEY", "VERSION", "Manifest", "ManifestError", "Packing", "PathOrUri", "SplitCounts",
           "check_split_name", "check_tokenizer", "chunk_dir_name", "clean_stale_streaming_shm", "dataset_uri",
           "image_id", "is_remote", "lance_uri", "mds_rows", "mds_split_dir", "parse_image_id", "parse_row_id",
           "read_manifest", "row_id", "tokens_record", *_READER]


def __getattr__(name: str):
    if name in _READER:
        from shared.token_dataset import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
