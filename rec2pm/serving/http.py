"""``python -m rec2pm serve``: a JSON-over-HTTP endpoint on the standard library's threading server.

=====================  ====================================================================
``GET /health``        ``{"status": "ok", "method", "fingerprint", "store"}``
``POST /observe``      ``{"users": [...], "items": [[...], ...]}`` -> ``{"users", "stored", "archived"}``;
                       the reply comes after the store committed the events
``POST /recommend``    ``{"users": [...], "k": 10, "exclude_seen": true}`` -> ``{"items", "scores"}``
                       (a score of ``null`` marks padding: fewer than k items were left)
=====================  ====================================================================

Errors answer ``{"error": message}``: 400 for bad input, 404 for an unknown path or user,
409 when compare-and-swap retries ran out, 413 for a body over the limit or a request over
the per-request bounds (``MAX_USERS_PER_REQUEST`` users, ``MAX_EVENTS_PER_REQUEST`` events:
a recommend request holds a ``(users, N)`` score matrix, so its size is bounded, not only
its body's), 500 for a store record that is corrupt or another model's (the message names
the user).
"""

from __future__ import annotations

import json
import math
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import StoreError, UnknownUser, VersionConflict

MAX_BODY_BYTES = 16 << 20
MAX_USERS_PER_REQUEST = 1024
MAX_EVENTS_PER_REQUEST = 1 << 16


class RequestTooLarge(ValueError):
    """A request over a per-request bound (answered 413)."""


def _check_bounds(users, items=None) -> None:
    # Lists only: the Recommender takes any iterable, and an object of 100k keys would
    # otherwise pass the bound by not being counted.
    if not isinstance(users, list):
        raise TypeError(f"users must be a JSON array of user ids, got {type(users).__name__}")
    if items is not None and not (isinstance(items, list) and all(isinstance(row, list) for row in items)):
        raise TypeError("items must be a JSON array with one array of item ids per user")
    if len(users) > MAX_USERS_PER_REQUEST:
        raise RequestTooLarge(f"a request may name at most {MAX_USERS_PER_REQUEST} users, got {len(users)}; split it")
    if items is not None:
        events = sum(map(len, items))
        if events > MAX_EVENTS_PER_REQUEST:
            raise RequestTooLarge(
                f"a request may carry at most {MAX_EVENTS_PER_REQUEST} events, got {events}; split it"
            )


class _Handler(BaseHTTPRequestHandler):
    timeout = 60  # seconds an idle keep-alive connection may hold its thread
    recommender = None  # set on the subclass make_server builds
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's
    # delayed ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # one line per request on stderr is noise at serving rates
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # say so, so that the client does not send more on this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._drain()  # a GET with a body
        if self.path != "/health":
            return self._reply(404, {"error": f"no such path {self.path!r}; expected GET /health"})
        rec = self.recommender
        self._reply(
            200, {"status": "ok", "method": rec.model.method, "fingerprint": rec.fingerprint, "store": rec.store.url}
        )

    def do_POST(self):
        routes = {"/observe": self._observe, "/recommend": self._recommend}
        if self.path not in routes:
            self._drain()
            return self._reply(404, {"error": f"no such path {self.path!r}; expected POST /observe or /recommend"})
        if self.headers.get("Transfer-Encoding"):  # only Content-Length framing; anything else would desync
            self.close_connection = True
            return self._reply(411, {"error": "send the body with a Content-Length header, not Transfer-Encoding"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._reply(
                413 if length > 0 else 400,
                {"error": f"Content-Length must be 0..{MAX_BODY_BYTES}, got {self.headers.get('Content-Length')!r}"},
            )
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise TypeError(f"the body must be a JSON object, got {type(body).__name__}")
            self._reply(200, routes[self.path](body))
        except UnknownUser as exc:
            self._reply(404, {"error": str(exc)})
        except VersionConflict as exc:
            self._reply(409, {"error": str(exc)})
        except RequestTooLarge as exc:
            self._reply(413, {"error": str(exc)})
        except StoreError as exc:
            self._reply(500, {"error": str(exc)})
        except (ValueError, TypeError) as exc:
            self._reply(400, {"error": str(exc)})
        except Exception as exc:  # never drop a request without an answer
            self._reply(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def _drain(self):
        """Read a body this server will not use; when it cannot be read whole (chunked, too
        large, malformed length), close the connection after the reply: its bytes must not
        be parsed as the next request."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or not (
            length is None or (length.isdigit() and int(length) <= MAX_BODY_BYTES)
        ):
            self.close_connection = True
        elif length:
            self.rfile.read(int(length))

    @staticmethod
    def _field(body: dict, name: str, default=None):
        if name not in body and default is None:
            raise ValueError(f"the body needs the field {name!r}")
        return body.get(name, default)

    def _observe(self, body: dict) -> dict:
        users, items = self._field(body, "users"), self._field(body, "items")
        _check_bounds(users, items)
        result = self.recommender.observe(users, items)
        return {"users": result.users, "stored": result.stored, "archived": result.archived}

    def _recommend(self, body: dict) -> dict:
        exclude = self._field(body, "exclude_seen", True)
        if not isinstance(exclude, bool):
            raise TypeError(f"exclude_seen must be true or false, got {exclude!r}")
        users = self._field(body, "users")
        _check_bounds(users)
        items, scores = self.recommender.recommend(users, self._field(body, "k", 10), exclude)
        return {
            "items": items.tolist(),
            "scores": [[s if math.isfinite(s) else None for s in row] for row in scores.tolist()],
        }


def make_server(recommender, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A server answering for ``recommender``; ``serve_forever()`` runs it (port 0: any free one).

    A port already in use raises ``OSError`` naming the host and port.
    """
    handler = type("RecommenderHandler", (_Handler,), {"recommender": recommender})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port}: {exc.strerror}{' (the port is in use)' if exc.errno == 98 else ''}",
        ) from None
    server.daemon_threads = True
    return server


def main_serve(args, parser) -> int:
    from .recommender import Recommender

    try:
        recommender = Recommender(
            args.checkpoint,
            args.store,
            device=args.device,
            session_cache_bytes=args.session_cache_mb << 20,
            memory_dtype=args.memory_dtype,
            seen_limit=args.seen_limit,
        )
        server = make_server(recommender, args.host, args.port)
    except (ValueError, TypeError, OSError, StoreError) as exc:
        parser.exit(2, f"rec2pm serve: error: {exc}\n")
    host, port = server.server_address[:2]
    print(
        json.dumps(
            {"listening": f"http://{host}:{port}", "method": recommender.model.method, "store": recommender.store.url}
        ),
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        recommender.close()
    return 0
