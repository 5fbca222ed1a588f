"""Datasets in object storage: ``s3://bucket/prefix`` and ``http(s)://host/path`` locations.

A dataset in a store is the same manifest, item index and shards as a dataset folder, under one
prefix. :class:`RemotePath` stands for such a location where the dataset code holds a path (it joins
names with ``/``, has a ``name``, and is its URL as a string). Small objects (the manifest, the item
index) are read whole; shards are streamed by :class:`ObjectReader`, which WebDataset opens for
every ``s3://``, ``http://`` and ``https://`` URL (this module registers it in
``webdataset.gopen.gopen_schemes`` when imported), so a shard is never downloaded whole before its
first sample is used.

**Clients.** ``s3://`` goes through boto3, which finds credentials where every AWS tool does
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws/credentials`` and ``~/.aws/config``, an instance role) and the endpoint of an
S3-compatible store in ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the
profile). With no credentials at all, requests go unsigned (a public bucket). ``http(s)://`` is a
plain GET with a byte range (Python's ``urllib``); a ``https://`` URL of a bucket that allows
public reads works the same way.

**Faults.** Every request and every read of a body runs under :class:`Retry`: a transient failure
(connection refused or reset, a timeout, a truncated body, HTTP 5xx, 408, 429, S3's ``SlowDown``)
is retried with exponential backoff; a broken stream is reopened at the byte where it broke (a
``Range`` request, with ``If-Match`` on the object's ETag so that a replaced object is an error, not
a splice of two objects). The tar reader above never sees the break, so every sample of the shard
is read exactly once. A permanent failure (403, 404, bad or missing credentials, an object changed
mid-read, retries used up) raises :class:`StoreError`: one line naming the URL and the cause.

**Also here:** :class:`ShardCache` (``data.shard_cache``: shards read to their end kept on a local
disk, used instead of the store next time), :func:`upload_dataset` (``shards synth|build|convert
--out s3://...``: a folder copied to a store, the manifest last) and :func:`local_cache_root` (where
the item, frozen-prefix and sequence-length caches of a dataset in a store go).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from webdataset.gopen import gopen_schemes

from transrec.errors import DataError

log = logging.getLogger("transrec.shards")
SCHEMES = ("s3", "http", "https")
_WRAPPED = re.compile(r"\nOriginal Traceback", re.S)


class StoreError(DataError):
    """A permanent failure reading a dataset from an object store: one line, the URL and the cause.

    Raised in a DataLoader worker, it reaches the main process re-made from torch's multi-line
    report; the one line is recovered from that report's last line."""

    def __init__(self, message: str):
        if _WRAPPED.search(message):
            last = message.rstrip().splitlines()[-1]
            head, sep, rest = last.partition(": ")
            message = rest if sep and head.endswith(type(self).__name__) else last
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # WebDataset appends the stream and URL to ``args``; the line stays one
        return self.message


class Transient(Exception):
    """A failure worth another try (internal: :class:`Retry` turns the last one into StoreError)."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def is_remote(path) -> bool:
    """True for an ``s3://``, ``http://`` or ``https://`` location (a str or a :class:`RemotePath`)."""
    if isinstance(path, RemotePath):
        return True
    if isinstance(path, Path):
        return False
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


class RemotePath:
    """A location in a store: what the dataset code needs of a path (``/``, ``name``, ``parent``);
    ``str()`` is the URL."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        url = str(url).rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme.lower() not in SCHEMES or not parsed.netloc:
            raise DataError(f"{url}: not a dataset location (a folder, s3://bucket/prefix or https://...)")
        if parsed.scheme.lower() == "s3" and len(parsed.netloc) < 3:
            raise DataError(f"{url}: an S3 bucket name has at least 3 characters")
        self.url = url

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0])

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


# ----------------------------------------------------------------------------- retrying

@dataclass
class Retry:
    """How transient failures are retried: up to ``attempts`` tries of one request or read, waiting
    ``first * 2**k`` seconds (jittered, at most ``cap``) between them, and giving up once ``budget``
    seconds have passed since the first failure. The defaults ride out a store restarting (tens of
    seconds). ``TRANSREC_STORE_RETRY_SECONDS`` sets the budget."""

    attempts: int = 20
    first: float = 0.25
    cap: float = 8.0
    budget: float = float(os.environ.get("TRANSREC_STORE_RETRY_SECONDS", "120"))

    def run(self, url: str, what: Callable, on_retry: Callable[[], None] | None = None):
        """``what()``; a :class:`Transient` failure is retried, after ``on_retry()`` (which may
        itself fail transiently)."""
        start = None
        for attempt in range(self.attempts):
            try:
                if attempt and on_retry is not None:
                    on_retry()
                return what()
            except Transient as exc:
                now = time.monotonic()
                start = now if start is None else start
                waited = now - start
                if attempt + 1 >= self.attempts or waited >= self.budget:
                    raise StoreError(f"{url}: {exc.cause}; gave up after {attempt + 1} tries over "
                                     f"{waited:.0f} s") from None
                delay = min(self.cap, self.first * 2 ** attempt) * (0.5 + random.random() / 2)
                delay = min(delay, max(0.0, self.budget - waited))
                RETRIES.note(url, exc.cause, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class _RetryCounter:
    """Retries in this process, with a rate-limited warning (a flaky store is visible, not silent)."""

    def __init__(self, interval: float = 10.0):
        self.count = 0
        self.interval = interval
        self._last = -1e9
        self._lock = threading.Lock()

    def note(self, url: str, cause: str, attempt: int, delay: float) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
        log.warning("%s: %s; retry %d in %.1f s (transient store failures retried so far in this "
                    "process: %d)", url, cause, attempt, delay, self.count)


RETRIES = _RetryCounter()
RETRY = Retry()


def first_contact_retry() -> Retry:
    """The retries of a dataset's first request (its manifest): as :data:`RETRY`, within 30 s."""
    return Retry(RETRY.attempts, RETRY.first, RETRY.cap, min(RETRY.budget, 30.0))


# ----------------------------------------------------------------------------- backends

class _Backend:
    """One kind of store: ``open`` a body at a byte offset, ``size`` of an object (None: missing),
    ``list`` the sizes under a prefix (None: the store cannot list)."""

    def open(self, url: str, offset: int, etag: str | None):  # -> (body, etag, size)
        raise NotImplementedError

    def size(self, url: str) -> int | None:
        raise NotImplementedError

    def list(self, url: str) -> dict[str, int] | None:
        return None

    def read_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions a body's ``read`` raises when the transfer breaks."""
        return (OSError, http.client.HTTPException)


# ---- S3 (boto3)

_S3_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                       "ThrottlingException", "RequestLimitExceeded", "OperationAborted"}
_S3_CAUSES = {
    "InvalidAccessKeyId": "the access key is not known to the store (bad credentials)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (bad credentials)",
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is not valid (bad credentials)",
    "NoSuchKey": "no such object",
    "NoSuchBucket": "no such bucket",
    "404": "no such object",
    "NotFound": "no such object",
    "403": "access denied",
    "PreconditionFailed": "the object changed while it was read (its ETag differs); was the dataset "
                          "replaced?",
}


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE")


class _S3(_Backend):
    """boto3, one client per process (clients do not survive a fork) and AWS environment."""

    def __init__(self):
        self._clients: dict[tuple, object] = {}
        self._anonymous = False
        self._lock = threading.Lock()

    def client(self):
        pid = (os.getpid(), *(os.environ.get(k) for k in _AWS_ENV))
        with self._lock:
            if pid not in self._clients:
                import boto3  # lazy: boto3 loads only for s3:// datasets
                from botocore import UNSIGNED  # lazy: boto3 loads only for s3:// datasets
                from botocore.config import Config  # lazy: boto3 loads only for s3:// datasets

                session = boto3.session.Session()
                self._anonymous = session.get_credentials() is None
                cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60,
                             max_pool_connections=16,
                             **({"signature_version": UNSIGNED} if self._anonymous else {}))
                self._clients = {pid: session.client("s3", config=cfg)}
            return self._clients[pid]

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        p = urlparse(url)
        return p.netloc, p.path.lstrip("/")

    def _fail(self, exc: BaseException, url: str):
        """Raise the failure as Transient or StoreError."""
        from botocore import exceptions as bx  # lazy: boto3 loads only for s3:// datasets

        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _S3_TRANSIENT_CODES or status >= 500 or status in (408, 429):
                raise Transient(f"{code or 'HTTP'} ({status})") from None
            detail = f": {err['Message']}" if err.get("Message") else ""
            cause = _S3_CAUSES.get(code) or f"{code or 'error'}{detail}"
            if status in (401, 403) and self._anonymous:
                cause += ("; no AWS credentials were found, so the request went unsigned (set "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
            raise StoreError(f"{url}: {cause} (HTTP {status})") from None
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            raise StoreError(f"{url}: incomplete AWS credentials ({exc})") from None
        if isinstance(exc, bx.ParamValidationError):
            raise StoreError(f"{url}: not a valid S3 location ({exc})") from None
        if isinstance(exc, bx.HTTPClientError | bx.ConnectionError | bx.IncompleteReadError
                      | bx.ResponseStreamingError | OSError) or type(exc).__module__.startswith("urllib3"):
            raise Transient(_describe(exc)) from None
        raise StoreError(f"{url}: {_describe(exc)}") from None

    def open(self, url, offset, etag):
        bucket, key = self.split(url)
        kw = {"Range": f"bytes={offset}-"} if offset else {}
        if etag:
            kw["IfMatch"] = etag
        try:
            r = self.client().get_object(Bucket=bucket, Key=key, **kw)
        except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
            self._fail(exc, url)
        size = _total_size(r.get("ContentRange"), offset + int(r.get("ContentLength", 0)))
        # the urllib3 response under botocore's StreamingBody: its read1 keeps every byte that arrived
        # (the length is checked by the reader against the manifest's or the response's size)
        body = r["Body"]
        raw = getattr(body, "_raw_stream", None)
        body = _Body(raw if hasattr(raw, "read1") else body, lambda e: self._fail(e, url))
        return body, r.get("ETag"), size

    def size(self, url):
        bucket, key = self.split(url)
        try:
            return int(self.client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
            if getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            self._fail(exc, url)

    def list(self, url):
        """{name: size} of the objects directly under the prefix ``url``; None when listing is not
        allowed (the caller asks for each object instead)."""
        bucket, prefix = self.split(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out: dict[str, int] = {}
        token = None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            try:
                r = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", **kw)
            except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
                if getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                    return None
                self._fail(exc, url)
            for obj in r.get("Contents", []):
                out[obj["Key"][len(prefix):]] = int(obj["Size"])
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return out


# ---- HTTP(S) (urllib)

class _HTTP(_Backend):
    timeout = 60.0

    def _fail(self, exc: BaseException, url: str):
        if isinstance(exc, urllib.error.HTTPError):
            status = exc.code
            if status >= 500 or status in (408, 429):
                raise Transient(f"HTTP {status} {exc.reason}") from None
            cause = {401: "authentication required", 403: "access denied", 404: "no such object",
                     410: "no such object",
                     412: "the object changed while it was read (its ETag differs); was the dataset "
                          "replaced?"}.get(status, str(exc.reason))
            raise StoreError(f"{url}: {cause} (HTTP {status})") from None
        if isinstance(exc, urllib.error.URLError):
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError | ssl.CertificateError):
                raise StoreError(f"{url}: the server's TLS certificate is not trusted ({reason})") from None
            if isinstance(reason, socket.gaierror):
                raise StoreError(f"{url}: unknown host ({reason})") from None
            raise Transient(_describe(reason if isinstance(reason, BaseException) else exc)) from None
        if isinstance(exc, OSError | http.client.HTTPException):
            raise Transient(_describe(exc)) from None
        raise StoreError(f"{url}: {_describe(exc)}") from None

    def open(self, url, offset, etag):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if etag and not etag.startswith("W/"):  # a weak ETag never matches with If-Match
            headers["If-Match"] = etag
        try:
            r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing after ``offset``: the object ends there
                return _Body(io.BytesIO(b""), lambda e: self._fail(e, url)), etag, offset
            self._fail(exc, url)
        except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
            self._fail(exc, url)
        length = r.headers.get("Content-Length")
        if offset and r.status == 200:  # the server ignored the range: skip to ``offset``
            left = offset
            while left:
                try:
                    got = r.read(min(left, 1 << 20))
                except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
                    r.close()
                    self._fail(exc, url)
                if not got:
                    r.close()
                    raise Transient("the body ended before the offset to resume from")
                left -= len(got)
            size = int(length) if length is not None else None
        else:
            size = _total_size(r.headers.get("Content-Range"),
                               offset + int(length) if length is not None else None)
        return _Body(r, lambda e: self._fail(e, url)), r.headers.get("ETag"), size

    def size(self, url):
        try:
            r = urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=self.timeout)
            r.close()
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                return None
            self._fail(exc, url)
        except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
            self._fail(exc, url)
        length = r.headers.get("Content-Length")
        return int(length) if length is not None else -1


def _total_size(content_range: str | None, fallback: int | None) -> int | None:
    """The object's size from ``Content-Range: bytes a-b/size`` (else ``fallback``)."""
    if content_range and "/" in content_range:
        tail = content_range.rsplit("/", 1)[1].strip()
        if tail.isdigit():
            return int(tail)
    return fallback


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


class _Body:
    """A response body whose read failures go through ``fail`` (Transient or StoreError). A read
    returns what one receive gives (``read1``), so the bytes that arrived before a connection broke
    are kept, never thrown away with a half-filled buffer."""

    def __init__(self, raw, fail: Callable[[BaseException], None]):
        self.raw, self.fail = raw, fail
        self._read = getattr(raw, "read1", None) or (lambda n: raw.read(min(n, 1 << 16)))

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except (Transient, StoreError):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
            self.fail(exc)
            raise

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped
            pass


_BACKENDS: dict[str, _Backend] = {"s3": _S3(), "http": _HTTP(), "https": _HTTP()}


def backend(url: str) -> _Backend:
    scheme = urlparse(str(url)).scheme.lower()
    if scheme not in _BACKENDS:
        raise DataError(f"{url}: not an object-store URL (s3://, http:// or https://)")
    return _BACKENDS[scheme]


# ----------------------------------------------------------------------------- reading

class ObjectReader(io.RawIOBase):
    """An object read front to back as a stream: a break in the transfer is retried and the read
    resumes at the byte where it broke (``If-Match`` the ETag of the first response).

    ``size``: the size the manifest gives (a body that ends before it is a broken transfer);
    ``cache``: a :class:`ShardCache` that keeps a copy of a shard read to its end."""

    def __init__(self, url: str, *, size: int | None = None, sha256: str | None = None,
                 retry: Retry | None = None, cache: ShardCache | None = None):
        super().__init__()
        self.url, self.retry = str(url), retry or RETRY
        self.backend = backend(self.url)
        self.pos, self.etag, self.size, self.body = 0, None, size, None
        self.sink = cache.writer(sha256, size) if cache is not None and sha256 and size else None
        self.retry.run(self.url, self._open)

    def _open(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        body, etag, size = self.backend.open(self.url, self.pos, self.etag)
        self.body, self.etag = body, self.etag or etag
        if self.size is None:
            self.size = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read of a closed object stream")
        if self.size is not None and self.pos >= self.size:
            self._done()
            return 0

        def once() -> bytes:
            if self.body is None:
                self._open()
            data = self.body.read(len(b))
            if not data and self.size is not None and self.pos < self.size:
                self.body.close()
                self.body = None
                raise Transient(f"the transfer ended at byte {self.pos} of {self.size}")
            return data

        data = self.retry.run(self.url, once, on_retry=self._open)
        n = len(data)
        b[:n] = data
        self.pos += n
        if self.sink is not None:
            self.sink.write(data)
        if not n or (self.size is not None and self.pos >= self.size):
            self._done()
        return n

    def _done(self) -> None:
        if self.sink is not None:
            self.sink.finish()
            self.sink = None

    def close(self) -> None:
        if self.sink is not None and self.size is not None and 0 < self.size - self.pos <= 1 << 20:
            try:  # the tar reader stops at the end-of-archive blocks: the padding completes the copy
                while self.sink is not None and self.readinto(bytearray(1 << 16)):
                    pass
            except DataError:
                pass
        if self.body is not None:
            self.body.close()
            self.body = None
        if self.sink is not None:
            self.sink.abandon()
            self.sink = None
        super().close()


def read_bytes(url: str, retry: Retry | None = None) -> bytes:
    """A small object, whole."""
    with ObjectReader(url, retry=retry) as r:
        return r.read()


def object_sizes(base: RemotePath, names: list[str], retry: Retry | None = None) -> dict[str, int | None]:
    """Size of each object ``base/name`` (None: missing): one listing where the store allows it,
    else a HEAD request per object (16 at a time)."""
    retry = retry or RETRY
    be = backend(str(base))
    listed = retry.run(str(base), lambda: be.list(str(base)))
    if listed is not None:
        return {n: listed.get(n) for n in names}
    from concurrent.futures import ThreadPoolExecutor  # lazy: only stores that cannot list

    def one(name: str):
        url = str(base / name)
        return retry.run(url, lambda: be.size(url))

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(names, pool.map(one, names)))


def upload_dataset(folder: str | Path, url: str, retry: Retry | None = None) -> None:
    """Copy a dataset folder to ``s3://bucket/prefix``: every file, the manifest last, so that a
    reader never meets a manifest whose shards are not all there yet (boto3's transfer manager:
    multipart for large files). ``http(s)://`` is read-only."""
    retry = retry or RETRY
    if urlparse(url).scheme.lower() != "s3":
        raise DataError(f"{url}: datasets are written to a folder or to s3://bucket/prefix; "
                        "http(s):// is read-only")
    be = _BACKENDS["s3"]
    bucket, prefix = _S3.split(url.rstrip("/"))
    files = sorted((p for p in Path(folder).iterdir() if p.is_file()),
                   key=lambda p: (p.name == "manifest.json", p.name))
    for f in files:
        key = f"{prefix}/{f.name}" if prefix else f.name
        target = f"s3://{bucket}/{key}"

        def put(f=f, key=key, target=target) -> None:
            try:
                be.client().upload_file(str(f), bucket, key)
            except Exception as exc:  # noqa: BLE001 - sorted into transient and permanent
                cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                try:
                    be._fail(cause, target)
                except (Transient, StoreError):
                    raise
                except Exception:  # noqa: BLE001 - a failure of another kind is still one line
                    raise StoreError(f"{target}: upload failed ({_describe(exc)})") from None

        retry.run(target, put)


# ----------------------------------------------------------------------------- the shard cache

class ShardCache:
    """Shards kept on a local disk (``data.shard_cache``): a shard read to its end with the size
    and sha256 the manifest gives is stored as ``DIR/<sha256>.tar``; the next read of it (a second
    epoch, a restart) opens that file instead. Least recently used files go first once the folder
    holds more than ``max_bytes``."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.tar"

    def lookup(self, sha256: str | None, size: int | None) -> Path | None:
        if not sha256:
            return None
        p = self.path(sha256)
        try:
            if p.stat().st_size == size:
                os.utime(p)  # recently used
                return p
        except OSError:
            pass
        return None

    def writer(self, sha256: str, size: int) -> _CacheWriter | None:
        if size > self.max_bytes:
            return None
        return _CacheWriter(self, sha256, size)

    def make_room(self, keep: Path) -> None:
        files = []
        for p in self.folder.glob("*.tar"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, s, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= s


class _CacheWriter:
    """The copy of one shard while it streams: kept (renamed into place) only when complete and its
    checksum is the manifest's; dropped otherwise."""

    def __init__(self, cache: ShardCache, sha256: str, size: int):
        self.cache, self.sha256, self.size = cache, sha256, size
        self.tmp = cache.folder / f".{sha256}.{os.getpid()}.{threading.get_ident()}.part"
        self.hash = hashlib.sha256()
        self.written = 0
        try:
            self.f = open(self.tmp, "wb")
        except OSError as exc:
            log.warning("%s: cannot write to the shard cache (%s)", cache.folder, exc)
            self.f = None

    def write(self, data: bytes) -> None:
        if self.f is None:
            return
        try:
            self.f.write(data)
        except OSError as exc:  # a full disk costs the copy, not the run
            log.warning("%s: shard cache write failed (%s); the shard is read from the store",
                        self.cache.folder, exc)
            self.abandon()
            return
        self.hash.update(data)
        self.written += len(data)

    def finish(self) -> None:
        if self.f is None:
            return
        self.f.close()
        self.f = None
        if self.written == self.size and self.hash.hexdigest() == self.sha256:
            dest = self.cache.path(self.sha256)
            os.replace(self.tmp, dest)
            self.cache.make_room(keep=dest)
        else:
            self.tmp.unlink(missing_ok=True)

    def abandon(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- what WebDataset opens

class _Known:
    """What the manifest says of each shard URL (size, sha256), and the shard cache in use; filled
    when a dataset is opened, read when WebDataset opens a URL (DataLoader workers fork with it)."""

    def __init__(self):
        self.shards: dict[str, tuple[int, str]] = {}
        self.cache: ShardCache | None = None


KNOWN = _Known()


def remember(url: str, size: int, sha256: str) -> None:
    KNOWN.shards[str(url)] = (int(size), str(sha256))


def use_shard_cache(folder: str | Path | None, max_bytes: int = 0) -> ShardCache | None:
    """Keep streamed shards in ``folder`` (at most ``max_bytes``); None or "" turns it off."""
    KNOWN.cache = ShardCache(folder, max_bytes) if folder else None
    return KNOWN.cache


def open_shard(url, mode: str = "rb", bufsize: int = 1 << 20, **_kw):
    """A shard as a buffered stream: from the shard cache when it holds it, else from the store.
    Also WebDataset's opener for ``s3://``, ``http://`` and ``https://``."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading from a store is supported (mode {mode!r})")
    url = str(url)
    size, sha = KNOWN.shards.get(url, (None, None))
    cache = KNOWN.cache
    if cache is not None:
        hit = cache.lookup(sha, size)
        if hit is not None:
            return open(hit, "rb")
    return io.BufferedReader(ObjectReader(url, size=size, sha256=sha, cache=cache),
                             buffer_size=max(int(bufsize), 1 << 20))


for _scheme in SCHEMES:
    gopen_schemes[_scheme] = open_shard


# ----------------------------------------------------------------------------- local caches

_ANNOUNCED: set[str] = set()


def local_cache_root(url: str) -> Path:
    """Where the item cache, the prefix cache and the sequence-length cache of a dataset in a store
    live unless ``data.cache_dir`` says: ``$TRANSREC_CACHE`` (else ``~/.cache/transrec``), in a
    folder named after the URL."""
    env = os.environ.get("TRANSREC_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "transrec"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", re.sub(r"^[a-z0-9]+://", "", str(url)))[-60:].strip("-.")
    return base / "stores" / f"{slug}-{hashlib.sha256(str(url).encode()).hexdigest()[:10]}"


def announce(url, folder: Path) -> None:
    """The one line that says where the local caches of a dataset in a store go (once per process,
    rank 0 only)."""
    key = f"{url}\0{folder}"
    if key in _ANNOUNCED or int(os.environ.get("RANK", "0") or 0) != 0:
        return
    _ANNOUNCED.add(key)
    print(f"data: {url} streams from the store; its local caches (item cache, frozen-prefix cache, "
          f"sequence lengths) are in {folder}", file=sys.stderr, flush=True)
