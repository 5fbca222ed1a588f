"""A dataset served over plain HTTP by a small loopback server that misbehaves on purpose: 5xx
answers, bodies cut short, no range support, refusals. Transient faults are retried and every
sample is still read once; permanent ones are one line naming the URL and the cause."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from test_shards_s3 import batches_key, content_of, eval_users

from transrec.shards.dataset import Dataset
from transrec.shards.loader import SequenceLoader
from transrec.shards.remote import RETRIES, Retry, StoreError, read_bytes
from transrec.shards.synth import synthesize


class Faults:
    """What the server does to the next requests of each file: a list of "503", "cut", "403" or
    "404" consumed one per request (then it serves normally)."""

    def __init__(self):
        self.plan: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.served = 0

    def next(self, name: str) -> str | None:
        with self.lock:
            todo = self.plan.get(name)
            return todo.pop(0) if todo else None


def serve(folder: Path, faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            name = self.path.rsplit("/", 1)[-1]
            fault = faults.next(name) if body else None
            f = folder / name
            if fault in ("503", "403", "404") or not f.is_file():
                code = int(fault) if fault else 404
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = f.read_bytes()
            self.send_response(200)  # never 206: this server ignores Range
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                faults.served += 1
                self.wfile.write(data[:len(data) // 2] if fault == "cut" else data)
                if fault == "cut":
                    self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = synthesize(tmp_path_factory.mktemp("http") / "world", domain="source", n_users=160, n_items=64,
                      seed=3, max_len=12, seq_shard_size=20)
    faults = Faults()
    server = serve(path, faults)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/world", path, faults
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_and_bodies_cut_short_are_retried_and_every_user_read_once(site, monkeypatch):
    url, path, faults = site
    monkeypatch.setattr("transrec.shards.remote.RETRY", Retry(first=0.01, cap=0.05))
    remote, local = Dataset.open(url), Dataset.open(path)
    names = [s.path.name for s in remote.seq_shards]
    for n in names:
        faults.plan[n] = ["503", "cut", "503", "cut"]
    before = RETRIES.count
    content = content_of(local)
    kw = dict(split="test", batch_size=8, max_len=6, seed=2)
    got = list(SequenceLoader(remote, content, **kw))
    assert batches_key(got) == batches_key(list(SequenceLoader(local, content, **kw)))
    users = eval_users(got)
    assert len(users) == len(set(users)) == sum(s.n_eval for s in remote.seq_shards)
    assert not any(faults.plan[n] for n in names)  # every planned fault was met
    assert RETRIES.count - before >= 4 * len(names)


def test_permanent_http_errors_are_one_line(site, monkeypatch):
    url, _, faults = site
    monkeypatch.setattr("transrec.shards.remote.RETRY", Retry(first=0.01, cap=0.05))
    faults.plan["manifest.json"] = ["403"]
    with pytest.raises(StoreError) as info:
        Dataset.open(url)
    assert str(info.value) == f"{url}/manifest.json: access denied (HTTP 403)"
    faults.plan["items.tsv"] = ["404"]
    with pytest.raises(StoreError, match=r"/world/items.tsv: no such object \(HTTP 404\)$"):
        Dataset.open(url)
    faults.plan["manifest.json"] = ["503"] * 10
    with pytest.raises(StoreError, match=r"/world/manifest.json: HTTP 503 .*; gave up after 3 tries over"):
        read_bytes(f"{url}/manifest.json", retry=Retry(attempts=3, first=0.01, cap=0.02))
    faults.plan.clear()
    with pytest.raises(StoreError, match=r"http://127.0.0.1:9/x/manifest.json: .*gave up after 2 tries"):
        read_bytes("http://127.0.0.1:9/x/manifest.json", retry=Retry(attempts=2, first=0.01, cap=0.02))
