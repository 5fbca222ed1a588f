"""``transrec serve``: the HTTP routes answer what the Recommender answers, every bad request is a 4xx
with one line of JSON (an unexpected failure a 500, after which the server still serves), concurrent
requests are scored in one pass with the same results, and the command refuses a corrupt export
before listening and exits 0 on SIGTERM.

Loopback only, free ports (port 0), every server stopped by the test that started it, bounded waits.
No starlette TestClient (it needs httpx, not in the lock): an in-process uvicorn in a thread, and the
real command as a subprocess, both talked to with urllib."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import uvicorn
from PIL import Image
from tiny_exports import tiny_world

from transrec.config import build_config
from transrec.inference.histories import dataset_sequences
from transrec.inference.recommender import Recommender
from transrec.inference.server import RecommendService, Refused, listen, make_app
from transrec.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "transrec.cli", "serve"]
WAIT_S = 120  # the longest any wait here may take (a loaded 2-core machine imports torch slowly)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic dataset, a random-init tiny content export of it and some histories."""
    root = tmp_path_factory.mktemp("serve")
    data, _, exp = tiny_world(root, seed=5)
    hists = [h[:6] for _, h in dataset_sequences(data)]
    return root, data, exp, hists


@pytest.fixture(scope="module")
def reference(world):
    """A Recommender of its own, to compare the server's answers with."""
    _, data, exp, _ = world
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    return rec


class _ThreadServer:
    """uvicorn serving an app in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        cfg = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_level="warning",
                             access_log=False)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop"


@pytest.fixture(scope="module")
def served(world):
    """(url, the served Recommender, its service) with small limits so they are easy to cross."""
    _, data, exp, _ = world
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    app = make_app(rec, max_batch=5, max_k=50, max_history=20, max_body_bytes=64 << 10)
    srv = _ThreadServer(app)
    yield srv.url, rec, app.state.service
    srv.stop()


def call(url: str, path: str, body=None, *, raw: bytes | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    """(status, body bytes) of one request; ``body`` is sent as JSON, ``raw`` as it is."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def refused(status: int, payload: bytes) -> str:
    """The error line of a refusal, checked to be one line of JSON ``{"error": ...}``."""
    assert b"\n" not in payload.strip(), payload
    doc = json.loads(payload)
    assert list(doc) == ["error"] and doc["error"] and "\n" not in doc["error"], doc
    return doc["error"]


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 14), color).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- in process
def test_recommend_answers_what_recommend_many_does(served, reference, world):
    url = served[0]
    png = _png()
    hists = world[3][:3] + [[world[3][4][0], {"title": "red striped bold"}],
                            [{"image": base64.b64encode(png).decode()}, world[3][5][0]]]
    status, payload = call(url, "/recommend", {"histories": hists, "k": 7})
    assert status == 200, payload
    got = json.loads(payload)["recommendations"]
    want = reference.recommend_many(hists[:4] + [[{"image": Image.open(io.BytesIO(png))}, world[3][5][0]]], 7)
    assert [g["items"] for g in got] == [w.ids for w in want]
    assert [g["scores"] for g in got] == [w.scores for w in want]  # floats survive JSON exactly
    # the options: history kept, a candidate subset, ids given as {"id": ...}
    cand = reference.item_ids[::3]
    body = {"histories": [[{"id": i} for i in hists[0]]], "k": 5, "exclude_history": False,
            "candidates": cand}
    status, payload = call(url, "/recommend", body)
    want = reference.recommend(hists[0], 5, exclude_history=False, candidates=cand)
    assert status == 200 and json.loads(payload)["recommendations"] == [{"items": want.ids,
                                                                         "scores": want.scores}]


@pytest.mark.parametrize("body, status, words", [
    ({"histories": [["t-i000001", "no-such-item"]]}, 422, "unknown item id 'no-such-item'"),
    ({"histories": [["t-i000001"]], "candidates": ["t-i000002", "gone"]}, 422, "unknown item id 'gone'"),
    ({"histories": [["t-i000001"], []]}, 422, "history 1: empty"),
    ({"histories": []}, 422, "histories: empty"),
    (b'{"histories": [["t-i000001"]', 400, "malformed JSON"),
    (b"\xff\xfe not utf-8", 400, "malformed JSON"),
    ({"histories": [["t-i000001"]] * 6}, 413, "6 in one request, the limit is 5"),
    ({"histories": [["t-i000001"] * 21]}, 413, "21 items, the limit is 20"),
    ({"histories": [["t-i000001"]], "k": 51}, 413, "k=51 is over the limit of 50"),
    ({"histories": [["t-i000001"]], "pad": "x" * (70 << 10)}, 413, "over the limit of 65536"),
    ({"histories": "t-i000001"}, 422, "histories must be a list"),
    ({"histories": ["t-i000001"]}, 422, "history 0: must be a list of items, got a string"),
    ({"histories": [[1.5]]}, 422, "history 0 item 0: an item id is a non-empty string, got a number"),
    ({"histories": [[{"title": 3}]]}, 422, "title must be a non-empty string"),
    ({"histories": [[{"name": "x"}]]}, 422, "an item is an id"),
    ({"histories": [["t-i000001"]], "k": "10"}, 422, "k must be an integer, got a string"),
    ({"histories": [["t-i000001"]], "k": True}, 422, "k must be an integer, got a boolean"),
    ({"histories": [["t-i000001"]], "k": 0}, 422, "k must be at least 1"),
    ({"histories": [["t-i000001"]], "exclude_history": "yes"}, 422, "exclude_history must be true or false"),
    ({"histories": [["t-i000001"]], "candidates": []}, 422, "candidates must be a non-empty list"),
    ({"history": [["t-i000001"]]}, 422, "unknown field 'history'"),
    ({}, 422, "missing field 'histories'"),
    ([["t-i000001"]], 422, "the body must be a JSON object, got a list"),
    ({"histories": [[{"image": "not base64!"}]]}, 422, "image is not valid base64"),
])
def test_bad_recommend_requests_get_one_line_4xx(served, body, status, words):
    url = served[0]
    got, payload = call(url, "/recommend", raw=body if isinstance(body, bytes) else None,
                        body=None if isinstance(body, bytes) else body)
    assert got == status, payload
    assert words in refused(got, payload)


def test_unknown_routes_and_methods_are_json_too(served):
    url = served[0]
    status, payload = call(url, "/nope")
    assert status == 404 and "Not Found" in refused(status, payload)
    status, payload = call(url, "/recommend", method="GET")
    assert status == 405 and refused(status, payload)


def test_items_join_the_pool_from_titles_and_images(served, reference, world):
    url, rec, _ = served
    _, _, _, hists = world
    before = len(rec)
    items = [{"id": "srv-new-1", "title": "blue dotted classic"},
             {"id": "srv-new-2", "image": base64.b64encode(_png()).decode()},
             {"id": "srv-new-3",
              "image": "data:image/png;base64," + base64.b64encode(_png((0, 90, 200))).decode()}]
    status, payload = call(url, "/items", {"items": items})
    assert status == 200, payload
    assert json.loads(payload) == {"added": 3, "items": before + 3}
    status, payload = call(url, "/recommend", {"histories": [hists[0]], "k": 50})
    top = json.loads(payload)["recommendations"][0]["items"]
    assert {"srv-new-1", "srv-new-2", "srv-new-3"} <= set(top)
    status, payload = call(url, "/recommend", {"histories": [["srv-new-1"]], "k": 3})
    assert status == 200 and "srv-new-1" not in json.loads(payload)["recommendations"][0]["items"]
    status, payload = call(url, "/health")
    assert status == 200 and json.loads(payload)["items"] == before + 3


@pytest.mark.parametrize("body, status, words", [
    ({"items": [{"id": "x", "image": base64.b64encode(b"not an image").decode()}]}, 422, "undecodable image"),
    ({"items": [{"id": "x", "image": "%%%"}]}, 422, "not valid base64"),
    ({"items": [{"id": "x"}]}, 422, "give one of 'title' or 'image'"),
    ({"items": [{"id": "x", "title": "a", "image": "b"}]}, 422, "give one of 'title' or 'image'"),
    ({"items": [{"title": "no id"}]}, 422, "missing field 'id'"),
    ({"items": [{"id": "x", "title": "  "}]}, 422, "title must be a non-empty string"),
    ({"items": []}, 422, "items must be a non-empty list"),
    ({"items": "x"}, 422, "items must be a non-empty list"),
    ({"items": ["x"]}, 422, "items[0]: must be an object"),
    (b"{", 400, "malformed JSON"),
])
def test_bad_items_requests_get_one_line_4xx(served, body, status, words):
    url, rec, _ = served
    before = len(rec)
    got, payload = call(url, "/items", raw=body if isinstance(body, bytes) else None,
                        body=None if isinstance(body, bytes) else body)
    assert got == status, payload
    assert words in refused(got, payload)
    assert len(rec) == before


def test_health(served, world):
    url, rec, _ = served
    status, payload = call(url, "/health")
    assert status == 200
    assert json.loads(payload) == {"status": "ok", "items": len(rec), "index": "exact", "model": "transrec",
                                   "export": str(world[2]), "device": "cpu"}


def test_an_unexpected_failure_is_a_500_and_the_server_keeps_serving(served, world, monkeypatch, caplog):
    url, rec, _ = served
    hist = world[3][0]

    def boom(*a, **kw):
        raise RuntimeError("simulated\nfailure")

    monkeypatch.setattr(rec, "recommend_many", boom)
    status, payload = call(url, "/recommend", {"histories": [hist]})
    assert status == 500 and "RuntimeError: simulated failure" in refused(status, payload)
    assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)  # + traceback
    monkeypatch.undo()
    status, payload = call(url, "/recommend", {"histories": [hist]})
    assert status == 200 and len(json.loads(payload)["recommendations"][0]["items"]) == 10


def test_health_answers_while_a_request_is_being_scored(served, world, monkeypatch):
    url, rec, _ = served
    started, release = threading.Event(), threading.Event()
    real = rec.recommend_many

    def slow(*a, **kw):
        started.set()
        release.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(rec, "recommend_many", slow)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=call(url, "/recommend", {"histories": [world[3][0]]})))
    t.start()
    try:
        assert started.wait(30)
        t0 = time.monotonic()
        status, _ = call(url, "/health", timeout=10)
        assert status == 200 and time.monotonic() - t0 < 5
    finally:
        release.set()
        t.join(30)
    assert out["r"][0] == 200


def test_concurrent_requests_are_scored_in_one_pass_with_the_same_results(world, reference):
    """Requests waiting together with the same options make one recommend_many call; each gets its
    own rows, as it would alone; other options, and a bad request among them, stay apart."""
    _, data, exp, hists = world
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    service = RecommendService(rec, max_batch=4)
    bodies = [{"histories": hists[i:i + 2], "k": 5} for i in range(0, 12, 2)]
    bodies += [{"histories": [hists[0]], "k": 3}, {"histories": [["nope"]], "k": 5}]

    async def all_at_once():
        return await asyncio.gather(*(service.recommend(b) for b in bodies), return_exceptions=True)

    got = asyncio.run(all_at_once())
    assert service.passes == 2  # the six good k=5 requests (the bad one refused apart), then k=3
    for b, g in zip(bodies[:7], got[:7]):  # other batches, other float rounding: scores to fp32
        want = reference.recommend_many(b["histories"], b["k"])
        assert [r["items"] for r in g["recommendations"]] == [w.ids for w in want]
        for r, w in zip(g["recommendations"], want):
            assert r["scores"] == pytest.approx(w.scores, rel=1e-5, abs=1e-6)
    assert isinstance(got[7], Refused) and got[7].status == 422 and "'nope'" in str(got[7])
    # coalesce=1: every request its own pass
    one = RecommendService(rec, max_batch=4, coalesce=1)

    async def three():
        return await asyncio.gather(*(one.recommend(b) for b in bodies[:3]))

    alone = asyncio.run(three())
    assert [[r["items"] for r in a["recommendations"]] for a in alone] == \
        [[r["items"] for r in g["recommendations"]] for g in got[:3]]
    assert one.passes == 3


def test_an_id_model_refuses_content_with_422(tmp_path, world):
    _, data, _, hists = world
    cfg = build_config("tiny", None, ["model.kind=id", f"data.path={data}"])
    torch.manual_seed(0)
    exp = build_model(cfg.model, n_items=40).save_export(tmp_path / "id", cfg,
                                                          {"kind": "full", "step": 0, "n_items": 40})
    rec = Recommender.from_export(exp, device="cpu")
    rec.add_items(data=data)
    service = RecommendService(rec)
    with pytest.raises(Refused, match="ID model") as exc:
        asyncio.run(service.add({"items": [{"id": "x", "title": "red"}]}))
    assert exc.value.status == 422
    with pytest.raises(Refused, match="no content encoder") as exc:
        asyncio.run(service.recommend({"histories": [[hists[0][0], {"title": "red"}]]}))
    assert exc.value.status == 422
    ok = asyncio.run(service.recommend({"histories": [hists[0]], "k": 4}))
    assert [r["items"] for r in ok["recommendations"]] == [rec.recommend(hists[0], 4).ids]


def test_an_ann_index_is_served_and_reported(world):
    _, data, exp, hists = world
    rec = Recommender.from_export(exp, device="cpu", index="hnsw")
    rec.add_items(data=data)
    service = RecommendService(rec)
    assert service.health()["index"] == "hnsw"
    got = asyncio.run(service.recommend({"histories": hists[:3], "k": 5}))
    want = rec.recommend_many(hists[:3], 5)  # the same index answers the same
    assert got == {"recommendations": [{"items": w.ids, "scores": w.scores} for w in want]}
    added = asyncio.run(service.add({"items": [{"id": "ann-new", "title": "green plain modern"}]}))
    assert added == {"added": 1, "items": 41}
    got = asyncio.run(service.recommend({"histories": [hists[0]], "k": 41, "exclude_history": False}))
    assert "ann-new" in got["recommendations"][0]["items"]


# ----------------------------------------------------------------------------------- the command
def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """``transrec serve ARGS`` with its standard output read line by line into a queue (its standard
    error into ``log``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    err = log.open("wb")
    proc = subprocess.Popen([*SERVE, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if it has not exited in 30 s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode


def test_the_command_serves_and_stops_cleanly_on_sigterm(world, reference, tmp_path):
    _, data, exp, hists = world
    log = tmp_path / "serve.log"
    proc, lines = _start(["--export", str(exp), "--data", str(data), "--port", "0", "--device", "cpu",
                          "--max-batch", "3"], log)
    try:
        try:
            line = lines.get(timeout=WAIT_S)
        except queue.Empty:
            line = None
        assert line, f"no 'serving' line (exit {proc.poll()}): {log.read_text()[-2000:]}"
        assert line.startswith(f"serving 40 items from {exp} on http://127.0.0.1:") and "(index exact" in line
        url = line.split(" on ", 1)[1].split()[0]
        status, payload = call(url, "/recommend", {"histories": [hists[1]], "k": 6})
        want = reference.recommend(hists[1], 6)
        assert status == 200 and json.loads(payload)["recommendations"] == [{"items": want.ids,
                                                                             "scores": want.scores}]
        bad = [({"histories": [["nope"]]}, 422), ({"histories": [[]]}, 422), (b"{", 400),
               ({"histories": [["t-i000001"]] * 4}, 413), ({"histories": [["t-i000001"]], "k": [1]}, 422)]
        for body, code in bad:
            status, payload = call(url, "/recommend", raw=body if isinstance(body, bytes) else None,
                                   body=None if isinstance(body, bytes) else body)
            assert status == code, (body, payload)
            refused(status, payload)
        status, payload = call(url, "/items", {"items": [{"id": "cli-new", "title": "green plain modern"}]})
        assert status == 200 and json.loads(payload) == {"added": 1, "items": 41}
        status, payload = call(url, "/recommend", {"histories": [hists[1]], "k": 41})
        assert "cli-new" in json.loads(payload)["recommendations"][0]["items"]
        status, payload = call(url, "/health")
        assert status == 200 and json.loads(payload)["items"] == 41
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


def test_the_command_refuses_a_corrupt_export_before_listening(world, tmp_path):
    _, data, exp, _ = world
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in exp.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    log = tmp_path / "serve.log"
    proc, lines = _start(["--export", str(bad), "--data", str(data), "--port", "0", "--device", "cpu"], log)
    try:
        proc.wait(WAIT_S)
    finally:
        _stop(proc)
    assert proc.returncode == 2
    assert lines.get(timeout=10) is None  # nothing on standard output: it never served
    err = log.read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transrec: error:") and str(bad) in err[0], err
