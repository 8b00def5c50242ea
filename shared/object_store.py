"""Object storage (Amazon S3 and S3-compatible stores) for token datasets: the one module that talks to it.

Credentials come the standard AWS way, resolved by boto3 and never stored by this project: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), a profile (``AWS_PROFILE`` and
the shared credentials file), or an instance / pod role. The endpoint of an S3-compatible store (MinIO,
Ceph, a cloud's S3 API) is ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or an explicit option of each
entry point (``--s3-endpoint-url``, ``data.s3_endpoint_url``), which ``configure`` puts in this process's
environment, so that DataLoader workers and MosaicML Streaming (which reads ``S3_ENDPOINT_URL``) use it too.

Three clients read the same objects: boto3 (manifests, publishing), Streaming (MDS shards; boto3 inside)
and Lance (its own Rust object store, given ``lance_options()``: the credentials boto3 resolved, so a
profile works for it as well). Failures become ``StoreError`` with one line naming the URI and the cause
(no such bucket, access denied, no credentials, endpoint unreachable).

dataprep also reads its *inputs* here (``--data s3://...``): ``list_entries`` (keys with sizes and ETags),
``get_bytes`` (one image of a folder) and ``ObjectReader`` (a Parquet file or a tar as a seekable file,
read by ranged GETs pinned to the ETag listed).
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Iterator, Optional, Tuple

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")  # boto3's, then Streaming's
STREAMING_ENDPOINT_VAR = "S3_ENDPOINT_URL"


class StoreError(OSError):
    """An object-store operation failed; the message is one line."""


def is_s3(uri: Any) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> Tuple[str, str]:
    """``s3://bucket/key/part`` -> ("bucket", "key/part"); refuses credentials written into the URI."""
    if not is_s3(uri):
        raise StoreError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise StoreError(f"{redact(uri)}: expected s3://BUCKET/PREFIX (credentials go in the environment or a "
                         "profile, never in the URI)")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(uri: str) -> str:
    """The URI with anything that looks like user:password@ removed (for messages)."""
    scheme, sep, rest = str(uri).partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else str(uri)


def configure(endpoint_url: Optional[str] = None) -> Optional[str]:
    """Set the endpoint for every client of this process and its children; returns the one in effect.

    ``endpoint_url`` (an entry point's option) wins over the environment; the environment's is also
    handed to Streaming, which reads only ``S3_ENDPOINT_URL``.
    """
    if endpoint_url:
        check_endpoint_url(endpoint_url)
        for var in ENDPOINT_VARS:
            os.environ[var] = endpoint_url
        return endpoint_url
    current = endpoint()
    if current:
        os.environ[STREAMING_ENDPOINT_VAR] = current
    return current


def check_endpoint_url(endpoint_url: Optional[str]) -> None:
    """An endpoint option's form, checked before any work (``configure`` checks it again when it applies it)."""
    if endpoint_url and not endpoint_url.startswith(("http://", "https://")):
        raise StoreError(f"S3 endpoint URL {endpoint_url!r} must start with http:// or https://")


def endpoint() -> Optional[str]:
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


# What a client depends on: a change of any of these (a test, a user switching profiles) makes a new one.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION", "AWS_REGION", *ENDPOINT_VARS)
_clients: Dict[Tuple, Any] = {}


def client():
    """A boto3 S3 client for the current environment and profile (thread-safe; one per process and
    environment: making a session costs tens of milliseconds, too much per object)."""
    import boto3

    key = (os.getpid(), *(os.environ.get(v) for v in _CLIENT_ENV))
    if key not in _clients:
        _clients.clear()
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint())
    return _clients[key]


def lance_options() -> Dict[str, str]:
    """``storage_options`` for Lance: the credentials and region boto3 resolves, and the endpoint."""
    import boto3

    session = boto3.session.Session()
    opts: Dict[str, str] = {}
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        opts.update(aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key)
        if frozen.token:
            opts["aws_session_token"] = frozen.token
    if session.region_name:
        opts["aws_region"] = session.region_name
    url = endpoint()
    if url:
        opts["aws_endpoint"] = url
        if url.startswith("http://"):
            opts["allow_http"] = "true"
    return opts


def describe(e: BaseException, uri: str) -> str:
    """One line for a failed operation on ``uri``."""
    where = redact(uri)
    try:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return f"{where}: {type(e).__name__}: {e}"
    if isinstance(e, NoCredentialsError):
        return (f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE)")
    if isinstance(e, EndpointConnectionError):
        return f"{where}: cannot reach the S3 endpoint {endpoint() or 'of AWS'} ({e})"
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return f"{where}: bucket {split_uri(uri)[0]!r} does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken",
                    "AccessDenied", "403", "Forbidden"):
            return (f"{where}: access denied ({code}): check the AWS credentials (AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and their permissions")
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{where}: no such object"
        return f"{where}: {code or type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{where}: {type(e).__name__}: {text}"


def _is_missing(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code", "")) in (
        "NoSuchKey", "404", "NotFound")


def get_bytes(uri: str) -> Optional[bytes]:
    """The object's bytes, or None when the bucket exists and the object does not."""
    bucket, key = split_uri(uri)
    try:
        data = client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        if _is_missing(e):
            return None
        raise StoreError(describe(e, uri)) from None
    read_counters["requests"] += 1
    read_counters["bytes"] += len(data)
    return data


def head(uri: str) -> Optional[Dict[str, Any]]:
    """The object's metadata (``ContentLength``, ``Metadata``...), or None when it does not exist."""
    bucket, key = split_uri(uri)
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if _is_missing(e):
            check_bucket(uri)  # a missing bucket answers HEAD with a bare 404 too
            return None
        raise StoreError(describe(e, uri)) from None


def check_bucket(uri: str) -> None:
    bucket, _ = split_uri(uri)
    try:
        client().list_objects_v2(Bucket=bucket, MaxKeys=1)
    except Exception as e:
        raise StoreError(describe(e, uri)) from None


def put_bytes(uri: str, data: bytes, metadata: Optional[Dict[str, str]] = None) -> None:
    bucket, key = split_uri(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})
    except Exception as e:
        raise StoreError(describe(e, uri)) from None


def upload_file(path: str, uri: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Upload a local file (multipart when large); ``metadata`` is stored as x-amz-meta-*."""
    bucket, key = split_uri(uri)
    try:
        client().upload_file(path, bucket, key, ExtraArgs={"Metadata": metadata or {}})
    except Exception as e:
        raise StoreError(describe(e, uri)) from None


def download_file(uri: str, path: str) -> None:
    bucket, key = split_uri(uri)
    try:
        client().download_file(bucket, key, path)
    except Exception as e:
        raise StoreError(describe(e, uri)) from None


def list_objects(prefix_uri: str) -> Iterator[Tuple[str, int]]:
    """(key relative to the prefix, size) of every object under ``prefix_uri`` (a directory-like prefix)."""
    for key, size, _ in list_entries(prefix_uri):
        yield key, size


def delete(uris) -> None:
    c = client()
    for uri in uris:
        bucket, key = split_uri(uri)
        try:
            c.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise StoreError(describe(e, uri)) from None


# --- reading source data (dataprep's s3:// inputs) ---------------------------------------------------------

# Bytes and requests this process fetched through ``get_bytes``, ``fetch_range`` and ``ObjectReader`` (benchmarks).
read_counters: Dict[str, int] = {"requests": 0, "bytes": 0}


def list_entries(prefix_uri: str) -> Iterator[Tuple[str, int, str]]:
    """(key relative to the prefix, size, ETag) of every object under ``prefix_uri`` (a directory-like
    prefix); the ETag without its quotes, as the store reports it (a content hash for single-part uploads)."""
    bucket, key = split_uri(prefix_uri)
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(prefix):], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')
    except Exception as e:
        raise StoreError(describe(e, prefix_uri)) from None


def fetch_range(uri: str, start: int, stop: int, etag: Optional[str] = None) -> bytes:
    """Bytes ``[start, stop)`` of an object; with ``etag``, refused (one line) if the object changed since."""
    bucket, key = split_uri(uri)
    args: Dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{stop - 1}"}
    if etag:
        args["IfMatch"] = f'"{etag}"'
    try:
        data = client().get_object(**args)["Body"].read()
    except Exception as e:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code", "")) in (
                "PreconditionFailed", "412"):
            raise StoreError(f"{redact(uri)}: the object changed while it was being read (ETag is no longer "
                             f"{etag})") from None
        raise StoreError(describe(e, uri)) from None
    read_counters["requests"] += 1
    read_counters["bytes"] += len(data)
    return data


class ObjectReader(io.RawIOBase):
    """One object as a read-only, seekable binary file (what ``tarfile`` and pyarrow's Parquet reader take),
    read by ranged GETs of at least ``block`` bytes: a sequential reader pays one request per block, a
    reader that seeks (Parquet's footer, then its column chunks) only for the ranges it reads. With ``etag``
    every request is conditional on it, so an object replaced mid-read is an error, never a mix."""

    def __init__(self, uri: str, size: int, etag: Optional[str] = None, block: int = 1 << 20):
        super().__init__()
        self.uri, self.size, self.etag, self.block = uri, int(size), etag, max(1, int(block))
        self._pos = 0
        self._buf, self._buf_start = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < want:
            pos = self._pos + done
            offset = pos - self._buf_start
            if not 0 <= offset < len(self._buf):
                self._buf = fetch_range(self.uri, pos, min(self.size, pos + max(self.block, want - done)), self.etag)
                self._buf_start, offset = pos, 0
                if not self._buf:
                    break
            n = min(want - done, len(self._buf) - offset)
            view[done:done + n] = self._buf[offset:offset + n]
            done += n
        self._pos += done
        return done

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes unless the object ends first (all the rest for a negative ``size``)."""
        n = self.size - self._pos if size is None or size < 0 else size
        buf = bytearray(max(0, min(n, self.size - self._pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])

    def readall(self) -> bytes:
        return self.read(-1)
