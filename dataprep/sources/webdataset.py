"""WebDataset tars: timm's imagenet-1k-wds by default (``<key>.jpg`` holds the image, ``<key>.cls`` the
label as decimal text).

A record is a sample: consecutive members sharing a key (the member name up to the first dot of its base
name, WebDataset's rule) with an image or a label member; other members are ignored (counted). Its id
within the source is ``SHARD#KEY``. The listing walks each tar's member headers (on disk it seeks past the
data; on S3 the headers come with the blocks read around them), counting samples and checking that labels
are there; a read task walks its tar to the first sample it was given and reads members from there on.

A tar damaged part-way (a header that is not one, data cut short) keeps the samples before the damage; the
damage itself becomes one failure named after the shard (see ``dataprep.sources.shards``).
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Any, BinaryIO, Dict, Iterator, Optional, Tuple

from dataprep.sources.records import Inspection, Outcome, check_label

IMAGE_KEYS, LABEL_KEY = ("jpg",), "cls"


def split_name(member: str) -> Tuple[Optional[str], str]:
    """(key, extension) of a member name, (None, '') for a name without an extension."""
    folder, base = posixpath.split(member)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return posixpath.join(folder, stem), ext


class WebDatasetFormat:
    name = "webdataset"

    def __init__(self, options: Dict[str, Any]):
        keys = options.get("image_keys") or IMAGE_KEYS
        self.image_keys = [keys] if isinstance(keys, str) else list(keys)
        self.label_key = options.get("label_key") or LABEL_KEY

    def options(self) -> Dict[str, Any]:
        return {"image_keys": list(self.image_keys), "label_key": self.label_key}

    def _samples(self, tf: tarfile.TarFile, counts: Dict[str, int]) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """(key, {extension: member}) of every sample with an image or a label member, in tar order."""
        wanted = set(self.image_keys) | {self.label_key}
        key, parts = None, {}
        while True:
            try:
                m = tf.next()
            except tarfile.TarError:  # the sample being gathered is a record (its reading fails), then the damage
                if key is not None and parts:
                    yield key, parts
                raise
            if m is None:
                break
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if k != key:
                if key is not None and parts:
                    yield key, parts
                key, parts = k, {}
            if k is None or ext not in wanted:
                counts["ignored"] += 1
                continue
            parts.setdefault(ext, m)
        if key is not None and parts:
            yield key, parts

    @staticmethod
    def _trailing_damage(f: BinaryIO, tf: tarfile.TarFile) -> Optional[str]:
        """tarfile ends its walk without a word at a header that is not one: anything but the end-of-archive
        zero blocks where the walk stopped is damage."""
        f.seek(tf.offset)
        if f.read(1024).strip(b"\0"):
            return f"corrupt tar: no valid member header at byte {tf.offset}, the rest of the shard cannot be read"
        return None

    def inspect(self, f: BinaryIO) -> Inspection:
        """Samples, ignored members, damage and whether any sample has a label, from the member headers. An
        exception: the tar cannot be opened at all (recorded as a failure)."""
        counts = {"ignored": 0}
        tf = tarfile.open(fileobj=f, mode="r:")
        records, labelled, error = 0, False, None
        try:
            for _, parts in self._samples(tf, counts):
                records += 1
                labelled = labelled or self.label_key in parts
        except tarfile.TarError as e:
            error = f"corrupt tar after {records} samples: {e}"
        if error is None:
            error = self._trailing_damage(f, tf)
        return Inspection(records, None, counts["ignored"], error, labelled)

    def fallback_path(self, name: str, position: int) -> str:
        return f"{name}#sample-{position}"

    def _outcome(self, tf: tarfile.TarFile, name: str, key: str, parts: Dict[str, Any], num_classes: int) -> Outcome:
        path = f"{name}#{key}"
        image = next((parts[k] for k in self.image_keys if k in parts), None)
        if image is None:
            return Outcome(path, -1, None, f"no image member ({', '.join('.' + k for k in self.image_keys)})")
        if self.label_key not in parts:
            return Outcome(path, -1, None, f"label missing (no .{self.label_key} member)")
        try:
            text = tf.extractfile(parts[self.label_key]).read().decode("utf-8", "replace").strip()
            data = tf.extractfile(image).read()
        except tarfile.TarError as e:
            return Outcome(path, -1, None, f"corrupt tar member: {e}")
        try:
            value: Any = int(text)
        except ValueError:
            value = text
        label, reason = check_label(value, num_classes)
        return Outcome(path, label, None if reason else data, reason)

    def read(self, f: BinaryIO, name: str, start: int, stop: int, num_classes: int) -> Iterator[Outcome]:
        """Samples [start, stop) in order, one outcome each; the ones before ``start`` are walked over."""
        if stop <= start:
            return
        tf = tarfile.open(fileobj=f, mode="r:")
        for position, (key, parts) in enumerate(self._samples(tf, {"ignored": 0})):
            if position >= start:
                yield self._outcome(tf, name, key, parts, num_classes)
            if position + 1 >= stop:
                return

