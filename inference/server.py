"""``transrec serve``: a small HTTP server around one :class:`~transrec.inference.recommender.Recommender`.

Routes (JSON in, JSON out; every refusal is a 4xx with one line ``{"error": "..."}``):

- ``POST /recommend`` ``{"histories": [[item, ...], ...], "k": 10, "exclude_history": true,
  "candidates": [id, ...]}`` (``k``, ``exclude_history`` and ``candidates`` optional) where an item is a
  pool id, ``{"id": ...}``, ``{"title": "..."}`` or ``{"image": "<base64 of an image file>"}`` →
  ``{"recommendations": [{"items": [...], "scores": [...]}, ...]}`` in request order: what
  :meth:`Recommender.recommend_many` returns for those histories.
- ``POST /items`` ``{"items": [{"id": ..., "title": ...} | {"id": ..., "image": "<base64>"}, ...]}``
  adds (or replaces) pool items from their content → ``{"added": n, "items": pool size}``.
- ``GET /health`` → ``{"status": "ok", "items": n, "index": ..., "model": kind, "export": path, ...}``.

Status codes: 400 malformed JSON; 413 a body, batch, history or ``k`` over its limit; 422 wrong types,
missing or unknown fields, unknown item ids (named), an empty history, content given to an ID model, an
undecodable image, and every :class:`~transrec.errors.UserError` the Recommender raises (its message);
404/405 an unknown route or method; 500 (one line, the traceback in the server log) anything else,
after which the server keeps serving.

The Recommender is not thread-safe: one :class:`asyncio.Lock` serialises every call into it, and the
torch work runs in a worker thread (``run_in_threadpool``), so ``/health`` answers while a request is
being scored. Concurrent ``/recommend`` requests with the same ``k``, ``exclude_history`` and
``candidates`` are *coalesced*: while one pass runs, the requests that arrive queue up, and the next
pass scores all of them (up to ``coalesce`` users; a request is never split) in one
``recommend_many`` call, then hands each its own rows. Scoring a catalogue costs a pass over every
item vector whatever the number of users, so under load this is most of the throughput; an idle server
answers a lone request at once. ``coalesce=1``: one request per pass.

starlette and uvicorn come with the ``serve`` extra (``pip install 'transrec[serve]'``); they are
imported only when a server is made, so the command line stays fast and works without them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from transrec.errors import UserError

log = logging.getLogger("transrec.serve")

MAX_BATCH = 256  # histories per /recommend request
MAX_K = 1000
MAX_HISTORY = 2000  # items per history (the model reads the last data.max_len; the rest only masks)
MAX_BODY_BYTES = 16 << 20
MAX_ADD = 10000  # items per /items request
COALESCE = 256  # users per scoring pass across concurrent requests
INDEXES = ("exact", "hnsw", "ivf")
_RAW = argparse.RawDescriptionHelpFormatter
_NEED_EXTRA = "transrec serve needs starlette and uvicorn (the serve extra: pip install 'transrec[serve]')"


class Refused(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# -- request parsing (pure functions: no starlette, no torch) -----------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _only(body: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise Refused(422, f"{where}: unknown field {extra[0]!r} (allowed: {', '.join(allowed)})")


def decode_image(text, where: str):
    """A PIL image from base64 of an image file's bytes (a ``data:image/...;base64,`` prefix is
    allowed); 422 when it is not base64 or not an image PIL can read."""
    from PIL import Image  # lazy: fast --help

    if not isinstance(text, str) or not text:
        raise Refused(422, f"{where}: image must be a non-empty base64 string, got {_kind(text)}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Refused(422, f"{where}: image is not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise Refused(422, f"{where}: undecodable image ({type(exc).__name__})") from None
    return im


def _item_id(v, where: str) -> str:
    if isinstance(v, str) and v:
        return v
    if _is_int(v):
        return str(v)
    raise Refused(422, f"{where}: an item id is a non-empty string, got {_kind(v)}")


def _history_entry(e, where: str):
    """A history entry as the Recommender takes it: an id string or ``{"title"|"image": ...}``."""
    if isinstance(e, dict):
        keys = [k for k in ("id", "title", "image") if k in e]
        if len(keys) != 1 or len(e) != 1:
            raise Refused(422, f"{where}: an item is an id, {{\"id\": ...}}, {{\"title\": ...}} or "
                               f"{{\"image\": <base64>}}; got the fields {sorted(e)}")
        v = e[keys[0]]
        if keys[0] == "id":
            return _item_id(v, where)
        if keys[0] == "title":
            if not isinstance(v, str) or not v.strip():
                raise Refused(422, f"{where}: title must be a non-empty string, got {_kind(v)}")
            return {"title": v}
        return {"image": decode_image(v, where)}
    return _item_id(e, where)


@dataclass
class RecommendRequest:
    histories: list[list]
    k: int = 10
    exclude_history: bool = True
    candidates: list[str] | None = None

    @property
    def key(self) -> tuple:
        """Requests with the same key can be scored in one pass."""
        return (self.k, self.exclude_history, None if self.candidates is None else tuple(self.candidates))


def parse_recommend(body, *, max_batch: int = MAX_BATCH, max_k: int = MAX_K,
                    max_history: int = MAX_HISTORY) -> RecommendRequest:
    """A ``/recommend`` body checked for types and limits (images decoded); :class:`Refused` if not."""
    if not isinstance(body, dict):
        raise Refused(422, f"the body must be a JSON object, got {_kind(body)}")
    _only(body, ("histories", "k", "exclude_history", "candidates"), "recommend")
    if "histories" not in body:
        raise Refused(422, "missing field 'histories' (a list of histories, each a list of items)")
    hs = body["histories"]
    if not isinstance(hs, list):
        raise Refused(422, f"histories must be a list of histories, got {_kind(hs)}")
    if not hs:
        raise Refused(422, "histories: empty (give at least one history)")
    if len(hs) > max_batch:
        raise Refused(413, f"histories: {len(hs)} in one request, the limit is {max_batch}")
    k = body.get("k", 10)
    if not _is_int(k):
        raise Refused(422, f"k must be an integer, got {_kind(k)}")
    if k < 1:
        raise Refused(422, f"k must be at least 1, got {k}")
    if k > max_k:
        raise Refused(413, f"k={k} is over the limit of {max_k}")
    ex = body.get("exclude_history", True)
    if not isinstance(ex, bool):
        raise Refused(422, f"exclude_history must be true or false, got {_kind(ex)}")
    cand = body.get("candidates")
    if cand is not None:
        if not isinstance(cand, list) or not cand:
            raise Refused(422, f"candidates must be a non-empty list of item ids, got {_kind(cand)}"
                               + (" (empty)" if cand == [] else ""))
        cand = [_item_id(c, f"candidates[{j}]") for j, c in enumerate(cand)]
    histories = []
    for u, h in enumerate(hs):
        if not isinstance(h, list):
            raise Refused(422, f"history {u}: must be a list of items, got {_kind(h)}")
        if not h:
            raise Refused(422, f"history {u}: empty (a user needs at least one item)")
        if len(h) > max_history:
            raise Refused(413, f"history {u}: {len(h)} items, the limit is {max_history}")
        histories.append([_history_entry(e, f"history {u} item {j}") for j, e in enumerate(h)])
    return RecommendRequest(histories, k, ex, cand)


def parse_items(body, *, max_add: int = MAX_ADD) -> tuple[list[str], list[str], list[str], list]:
    """An ``/items`` body → (title ids, titles, image ids, PIL images); :class:`Refused` if not."""
    if not isinstance(body, dict):
        raise Refused(422, f"the body must be a JSON object, got {_kind(body)}")
    _only(body, ("items",), "items")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise Refused(422, "items must be a non-empty list of {\"id\": ..., \"title\" | \"image\": ...}"
                           + ("" if "items" in body else " (missing field 'items')"))
    if len(items) > max_add:
        raise Refused(413, f"items: {len(items)} in one request, the limit is {max_add}")
    tid, titles, iid, images = [], [], [], []
    for j, it in enumerate(items):
        where = f"items[{j}]"
        if not isinstance(it, dict):
            raise Refused(422, f"{where}: must be an object {{\"id\": ..., \"title\" | \"image\": ...}}, "
                               f"got {_kind(it)}")
        _only(it, ("id", "title", "image"), where)
        if "id" not in it:
            raise Refused(422, f"{where}: missing field 'id'")
        i = _item_id(it["id"], where)
        if ("title" in it) == ("image" in it):
            raise Refused(422, f"{where} ({i}): give one of 'title' or 'image'")
        if "title" in it:
            t = it["title"]
            if not isinstance(t, str) or not t.strip():
                raise Refused(422, f"{where} ({i}): title must be a non-empty string, got {_kind(t)}")
            tid.append(i)
            titles.append(t)
        else:
            iid.append(i)
            images.append(decode_image(it["image"], f"{where} ({i})"))
    return tid, titles, iid, images


# -- the app ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    req: RecommendRequest
    future: asyncio.Future
    out: object = field(default=None)  # list of results, or a Refused / Exception


class RecommendService:
    """The routes' logic around one Recommender: validation, the lock, coalescing, error mapping.

    Needs a running event loop (it is used from starlette's handlers); the scoring itself runs in a
    worker thread, one call into the Recommender at a time."""

    def __init__(self, rec, *, max_batch: int = MAX_BATCH, max_k: int = MAX_K, max_history: int = MAX_HISTORY,
                 max_body_bytes: int = MAX_BODY_BYTES, max_add: int = MAX_ADD, coalesce: int = COALESCE):
        for name, v in (("max_batch", max_batch), ("max_k", max_k), ("max_history", max_history),
                        ("max_body_bytes", max_body_bytes), ("max_add", max_add), ("coalesce", coalesce)):
            if not _is_int(v) or v < 1:
                raise UserError(f"serve: {name} must be a positive integer, got {v!r}")
        self.rec = rec
        self.max_batch, self.max_k, self.max_history = max_batch, max_k, max_history
        self.max_body_bytes, self.max_add, self.coalesce = max_body_bytes, max_add, coalesce
        self._lock: asyncio.Lock | None = None
        self._pending: list[_Job] = []
        self._drainer: asyncio.Task | None = None
        self.passes = 0  # recommend_many calls made (how well requests coalesce; the tests read it)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:  # made on first use, inside the server's loop
            self._lock = asyncio.Lock()
        return self._lock

    # -- bodies
    async def read_json(self, request):
        """The request's JSON body, read up to ``max_body_bytes`` (413 past it, 400 if malformed)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise Refused(400, f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise Refused(413, f"body of {int(declared)} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"malformed JSON: {exc}") from None

    # -- /recommend
    async def recommend(self, body) -> dict:
        from starlette.concurrency import run_in_threadpool  # optional: starlette (the serve extra)

        limits = {"max_batch": self.max_batch, "max_k": self.max_k, "max_history": self.max_history}
        if _has_images(body):  # decoding images is CPU work: off the loop
            req = await run_in_threadpool(parse_recommend, body, **limits)
        else:
            req = parse_recommend(body, **limits)
        job = _Job(req, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        out = await job.future
        if isinstance(out, BaseException):
            raise out
        return {"recommendations": [{"items": r.ids, "scores": r.scores} for r in out]}

    async def _drain(self) -> None:
        """Score the queued requests, a pass at a time: the first one waiting and every other one with
        its key, up to ``coalesce`` users (the first is always taken)."""
        from starlette.concurrency import run_in_threadpool  # optional: starlette (the serve extra)

        batch: list[_Job] = []
        try:
            while self._pending:
                async with self.lock:
                    key = self._pending[0].req.key
                    batch, rest, users = [], [], 0
                    for j in self._pending:
                        n = len(j.req.histories)
                        if j.req.key == key and (not batch or users + n <= self.coalesce):
                            batch.append(j)
                            users += n
                        else:
                            rest.append(j)
                    self._pending = rest
                    await run_in_threadpool(self._score, batch)
                for j in batch:
                    if not j.future.done():
                        j.future.set_result(j.out)
                batch = []
        finally:  # cancelled (the loop is closing) or the thread failed to run: answer every waiter
            self._drainer = None
            for j in batch + self._pending:
                if not j.future.done():
                    j.future.set_result(RuntimeError("the request was not scored (the server is stopping)"))
            self._pending = []

    def _score(self, jobs: list[_Job]) -> None:
        """(worker thread, under the lock) One ``recommend_many`` over ``jobs``' histories; on a failure
        with several requests, each again alone, so one bad request cannot fail the others."""
        ok = []
        for j in jobs:
            try:
                self._check_ids(j.req)
                ok.append(j)
            except Refused as exc:
                j.out = exc
        if not ok:
            return
        req = ok[0].req
        hists = [h for j in ok for h in j.req.histories]
        try:
            self.passes += 1
            recs = self.rec.recommend_many(hists, req.k, exclude_history=req.exclude_history,
                                           candidates=req.candidates)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            if len(ok) > 1:
                for j in ok:
                    self._score([j])
                return
            ok[0].out = _mapped(exc)
            return
        at = 0
        for j in ok:
            n = len(j.req.histories)
            j.out = recs[at:at + n]
            at += n

    def _check_ids(self, req: RecommendRequest) -> None:
        """422 naming the first unknown id of the histories or candidates (and how many there are)."""
        rec = self.rec
        unknown = [(f"history {u}", e) for u, h in enumerate(req.histories) for e in h
                   if isinstance(e, str) and e not in rec]
        unknown += [("candidates", c) for c in req.candidates or () if c not in rec]
        if unknown:
            where, first = unknown[0]
            more = f" ({len(unknown)} unknown ids in all)" if len(unknown) > 1 else ""
            raise Refused(422, f"unknown item id {first!r} in {where}: not among the {len(rec)} items{more}")

    # -- /items
    async def add(self, body) -> dict:
        from starlette.concurrency import run_in_threadpool  # optional: starlette (the serve extra)

        if getattr(self.rec, "kind", None) == "id":
            raise Refused(422, "this export is an ID model: it has no content encoder and scores its own "
                               "catalogue only; /items needs a content model (TransRec)")
        tid, titles, iid, images = await run_in_threadpool(parse_items, body, max_add=self.max_add)
        async with self.lock:
            await run_in_threadpool(self._add, tid, titles, iid, images)
            return {"added": len(tid) + len(iid), "items": len(self.rec)}

    def _add(self, tid, titles, iid, images) -> None:
        try:
            self.rec.add_items(titles=titles or None, images=images or None, ids=tid + iid, progress=False)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            raise _mapped(exc) from None

    def health(self) -> dict:
        rec = self.rec
        return {"status": "ok", "items": len(rec), "index": rec.index, "model": getattr(rec, "kind", None),
                "export": str(getattr(rec, "source", "")), "device": str(getattr(rec, "device", ""))}


def _has_images(body) -> bool:
    """Whether a /recommend body carries images (decoding them is worth a worker thread)."""
    hs = body.get("histories") if isinstance(body, dict) else None
    return isinstance(hs, list) and any(isinstance(h, list) and any(isinstance(e, dict) and "image" in e
                                                                     for e in h) for h in hs)


def _mapped(exc: Exception) -> Exception:
    """A Recommender's exception as the request's answer: a UserError is a 422 with its message,
    anything else stays as it is (the route answers 500 and logs its traceback)."""
    if isinstance(exc, UserError) and not isinstance(exc, Refused):
        return Refused(422, str(exc))
    return exc


def _error(status: int, message: str):
    from starlette.responses import JSONResponse  # optional: starlette (the serve extra)

    return JSONResponse({"error": one_line(message)}, status_code=status)


def make_app(rec, *, max_batch: int = MAX_BATCH, max_k: int = MAX_K, max_history: int = MAX_HISTORY,
             max_body_bytes: int = MAX_BODY_BYTES, max_add: int = MAX_ADD, coalesce: int = COALESCE):
    """The starlette app serving ``rec`` (see the module docstring); ``app.state.service`` is its
    :class:`RecommendService`. Limits: ``max_batch`` histories per request, ``k`` up to ``max_k``,
    ``max_history`` items per history, ``max_body_bytes`` per body, ``max_add`` items per ``/items``;
    ``coalesce``: users per scoring pass across concurrent requests."""
    try:
        from starlette.applications import Starlette  # optional: starlette (the serve extra)
        from starlette.exceptions import HTTPException  # optional: starlette (the serve extra)
        from starlette.responses import JSONResponse  # optional: starlette (the serve extra)
        from starlette.routing import Route  # optional: starlette (the serve extra)
    except ImportError:
        raise UserError(_NEED_EXTRA) from None

    service = RecommendService(rec, max_batch=max_batch, max_k=max_k, max_history=max_history,
                               max_body_bytes=max_body_bytes, max_add=max_add, coalesce=coalesce)

    def endpoint(route: str, work: Callable):
        async def handle(request):
            try:
                return JSONResponse(await work(await service.read_json(request)))
            except Refused as exc:
                return _error(exc.status, str(exc))
            except UserError as exc:
                return _error(422, str(exc))
            except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
                log.error("/%s: unexpected error", route, exc_info=exc)
                return _error(500, f"internal error ({type(exc).__name__}: {one_line(str(exc), 200)}); "
                                   "the server log has the details")
        return handle

    async def health(request):
        return JSONResponse(service.health())

    async def http_error(request, exc):
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def server_error(request, exc):  # a last resort: the routes catch their own
        log.error("unexpected error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__})")

    app = Starlette(routes=[Route("/recommend", endpoint("recommend", service.recommend), methods=["POST"]),
                            Route("/items", endpoint("items", service.add), methods=["POST"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app


# -- running it ---------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one); a UserError naming the address
    if it cannot be had (in use, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(rec, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          on_listen: Callable[[str, int], None] | None = None, **limits) -> None:
    """Serve ``rec`` with uvicorn in this process (one worker, the h11 protocol) until SIGTERM or
    SIGINT, then finish the requests in flight and return (the signal is not re-raised: a stopped
    server exits 0). ``port`` 0: a free port; ``on_listen(host, port)`` is called once it listens.
    ``limits``: :func:`make_app`'s keywords."""
    try:
        import uvicorn  # optional: uvicorn (the serve extra)
    except ImportError:
        raise UserError(_NEED_EXTRA) from None

    app = make_app(rec, **limits)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s: transrec serve: %(message)s"))
        log.addHandler(h)
        log.setLevel(log_level.upper() if log_level != "trace" else "DEBUG")
    config = uvicorn.Config(app, log_level=log_level, http="h11", loop="asyncio", lifespan="off",
                            access_log=log_level in ("debug", "trace"), timeout_graceful_shutdown=30,
                            server_header=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; these handlers take it, so
    # a server stopped on purpose returns normally (exit 0) instead of dying of the signal. A signal
    # before uvicorn installs its own handlers stops it as soon as it starts.
    stopped: list[int] = []

    def stop(sig, frame) -> None:
        stopped.append(sig)
        server.should_exit = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_listen:
            on_listen(host, bound)
        if not stopped:
            server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    if stopped:
        log.info("stopped by %s", signal.Signals(stopped[0]).name)


# -- the command line ---------------------------------------------------------------------------------
def _from_export(export: str, device, index: str, options: dict | None = None):
    """``Recommender.from_export`` with ``index``; an export that cannot be loaded is one line (a
    UserError), whatever the loader raised."""
    from transrec.inference.recommender import Recommender  # lazy: fast --help

    try:
        return Recommender.from_export(export, device=device, index=index, index_options=options)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as the loader's own type
        raise UserError(f"{export}: cannot load the export ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})") from None


def cmd_serve(args) -> int:
    if not (args.data or args.catalogue or args.vectors):
        raise UserError("serve: give the candidate items with --data DIR, --catalogue DIR and/or "
                        "--vectors DIR")
    for name in ("max_batch", "max_k", "coalesce"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_body_mib <= 0:
        raise UserError(f"--max-body-mib must be positive, got {args.max_body_mib}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    options = {k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v is not None}
    if any(v < 1 for v in options.values()):
        raise UserError(f"--ef-search and --nprobe must be at least 1, got {options}")
    rec = _from_export(args.export, args.device, args.index, options)
    if args.vectors:
        rec.load_vectors(args.vectors)
    if args.data:
        rec.add_items(data=args.data)
    if args.catalogue:
        rec.add_items(catalogue=args.catalogue)
    if not len(rec):
        raise UserError("serve: no candidate items (the sources given hold no usable item)")
    # one pass before listening: the table, the index and the first-call costs are paid here, and a
    # model that cannot score stops the command instead of failing every request
    rec.recommend_many([[rec.item_ids[0]]], 1, exclude_history=False)
    index = rec.index

    def banner(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {len(rec)} items from {args.export} on http://{shown}:{port} (index {index}, "
              f"model {rec.kind}, device {rec.device.type})", flush=True)

    serve(rec, host=args.host, port=args.port, log_level=args.log_level, on_listen=banner,
          max_batch=args.max_batch, max_k=args.max_k, max_body_bytes=int(args.max_body_mib * (1 << 20)),
          coalesce=args.coalesce)
    return 0


def add_parser(sub) -> None:
    """Register ``transrec serve`` on an argparse subparsers object."""
    p = sub.add_parser(
        "serve", help="an HTTP server answering recommendations from an export (POST /recommend)",
        formatter_class=_RAW,
        description="Serve top-k recommendations over HTTP from an export (full or adapter). The pool is "
                    "a dataset's items (--data), a catalogue folder's (--catalogue) and/or item vectors "
                    "written by `transrec vectors` (--vectors); POST /items adds more from titles or images. "
                    "One process; SIGTERM or Ctrl+C finishes the requests in flight and exits 0.",
        epilog="examples:\n"
               "  transrec serve --export exports/pre --data data/source --port 8000\n"
               "  curl -s localhost:8000/recommend -d '{\"histories\": [[\"s-i000001\", {\"title\": \"red "
               "striped bold\"}]], \"k\": 5}'\n"
               "  curl -s localhost:8000/items -d '{\"items\": [{\"id\": \"new-1\", \"title\": \"blue dotted"
               "\"}]}'\n"
               "  curl -s localhost:8000/health\n"
               "POST /recommend {\"histories\": [[item, ...], ...], \"k\": 10, \"exclude_history\": true, "
               "\"candidates\": [ids]}\n"
               "  an item: a pool id, {\"title\": \"...\"} or {\"image\": \"<base64 of an image file>\"}\n"
               "  -> {\"recommendations\": [{\"items\": [...], \"scores\": [...]}, ...]} in request order\n"
               "POST /items {\"items\": [{\"id\": \"...\", \"title\": \"...\"} | "
               "{\"id\": \"...\", \"image\": \"<base64>\"}]} -> {\"added\": n, \"items\": N}\n"
               "Errors: 4xx with {\"error\": \"one line\"} (400 malformed JSON, 413 over a limit, 422 bad "
               "input).")
    p.add_argument("--export", required=True, help="export folder (transrec export)")
    p.add_argument("--data", help="dataset folder whose items are candidates")
    p.add_argument("--catalogue", help="catalogue folder (items.csv + images/) whose items are candidates")
    p.add_argument("--vectors", help="item vectors folder (transrec vectors) whose items are candidates")
    p.add_argument("--index", choices=INDEXES, default="exact",
                   help="exact: score every item; hnsw, ivf: a FAISS approximate index "
                        "(default: %(default)s)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="hnsw: candidates a search keeps (more: higher recall, slower; default 128)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="ivf: lists a search visits (more: higher recall, slower; default 2·√lists)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="port (0: a free one, printed; default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help="histories per request at most (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=MAX_K, help="k at most (default: %(default)s)")
    p.add_argument("--max-body-mib", type=float, default=MAX_BODY_BYTES / (1 << 20),
                   help="request body size at most, MiB (default: %(default)s)")
    p.add_argument("--coalesce", type=int, default=COALESCE,
                   help="users scored in one pass across concurrent requests at most; 1: one request "
                        "per pass (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug",
                                                           "trace"],
                   help="server log level; debug logs every request (default: %(default)s)")
    p.set_defaults(func=cmd_serve)
