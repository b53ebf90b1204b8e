"""The HTTP endpoint, through a real HTTP client on 127.0.0.1; a bounded mixed load test."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rec2pm.cli import main
from rec2pm.serving import Recommender
from rec2pm.serving.http import make_server

from .models import N_ITEMS, S, small_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path):
    torch.set_num_threads(1)
    rec = Recommender(small_model("rec2pm-o"), f"sqlite:///{tmp_path / 'http.db'}?synchronous=NORMAL", device="cpu")
    httpd = make_server(rec, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def call(connection, method, path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())


def connect(server):
    return http.client.HTTPConnection(*server.server_address[:2], timeout=30)


def test_health_observe_recommend(server):
    conn = connect(server)
    status, health = call(conn, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["method"] == "rec2pm"
    status, observed = call(conn, "POST", "/observe", {"users": ["a", 7], "items": [list(range(1, S + 3)), [4]]})
    assert status == 200 and observed == {"users": ["a", "7"], "stored": [S + 2, 1], "archived": [1, 0]}
    status, top = call(conn, "POST", "/recommend", {"users": ["a", 7], "k": 5})
    assert status == 200 and len(top["items"]) == 2 and len(top["items"][0]) == 5
    assert not {S + 1, S + 2} & set(top["items"][0]) and 4 not in top["items"][1]
    status, everything = call(conn, "POST", "/recommend", {"users": [7], "k": N_ITEMS})
    assert everything["items"][0][-1] == 0 and everything["scores"][0][-1] is None  # padding past the candidates


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/recommend", {"users": ["nobody"], "k": 3}, 404, "'nobody'"),
        ("POST", "/observe", {"users": ["a"], "items": [[N_ITEMS + 1]]}, 400, "outside the catalogue"),
        ("POST", "/observe", {"users": ["a"]}, 400, "the field 'items'"),
        ("POST", "/observe", b"{not json", 400, "Expecting property name"),
        ("POST", "/observe", [1, 2], 400, "JSON object"),
        ("POST", "/recommend", {"users": ["a"], "k": 0}, 400, "k must be"),
        ("POST", "/recommend", {"users": [], "k": 3}, 400, "user_ids is empty"),
        ("POST", "/nowhere", {}, 404, "no such path '/nowhere'"),
        ("GET", "/metrics", None, 404, "no such path '/metrics'"),
        ("POST", "/recommend", {"users": ["a"] * 1025, "k": 3}, 413, "at most 1024 users, got 1025"),
        ("POST", "/observe", {"users": ["a"] * 2, "items": [[1] * 40_000] * 2}, 413, "at most 65536 events, got 80000"),
        ("POST", "/recommend", {"users": {f"u{i}": 0 for i in range(2000)}, "k": 3}, 400, "users must be a JSON array"),
        ("POST", "/observe", {"users": ["a"], "items": [5]}, 400, "one array of item ids per user"),
    ],
)
def test_errors_name_what_was_wrong(server, method, path, body, status, message):
    conn = connect(server)
    got, reply = call(conn, method, path, body)
    assert got == status and message in reply["error"]
    assert call(conn, "GET", "/health")[0] == 200  # the connection and the server live on


def test_mixed_load_loses_no_acknowledged_event(server):
    """4 clients x 400 requests, observe and recommend mixed; p50/p99 latency printed."""
    clients, requests, users = 4, 400, [f"user{i}" for i in range(8)]
    acknowledged = [[0] * len(users) for _ in range(clients)]

    def client(c):
        conn, latencies = connect(server), []
        for r in range(requests):
            user = (c * 3 + r) % len(users)
            start = time.perf_counter()
            if r % 2 == 0 or r < 2:
                body = {"users": [users[user]], "items": [[1 + (c + r) % N_ITEMS]]}
                status, reply = call(conn, "POST", "/observe", body)
                assert status == 200, reply
                acknowledged[c][user] += reply["stored"][0]
            else:
                status, reply = call(conn, "POST", "/recommend", {"users": [users[user]], "k": 5})
                assert status in (200, 404), reply  # 404: that user has no event yet
            latencies.append(time.perf_counter() - start)
        return latencies

    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for ts in pool.map(client, range(clients)) for t in ts)
    print(
        f"\n{len(latencies)} requests: p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms"
    )
    records = server.RequestHandlerClass.recommender.store.get_many(users)
    for u, user in enumerate(users):
        expected = sum(acknowledged[c][u] for c in range(clients))
        assert records[user].archived_events + len(records[user].recent) == expected, user


def test_cli_serve_answers_and_a_port_in_use_is_named(tmp_path, checkpoint, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    process = subprocess.Popen(
        [sys.executable, "-m", "rec2pm", "serve", str(checkpoint), "--store", url, "--port", "0", "--device", "cpu"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started = json.loads(process.stdout.readline())
        host, port = started["listening"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        assert call(conn, "GET", "/health")[1]["store"] == url
        with pytest.raises(SystemExit) as info:
            main(["serve", str(checkpoint), "--store", "memory://", "--port", port])
        assert info.value.code == 2 and f"127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        process.terminate()
        process.wait(30)


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*in use"):
            make_server(None, "127.0.0.1", port)


def test_chunked_bodies_are_refused_and_the_connection_closed(server):
    conn = connect(server)
    conn.putrequest("POST", "/observe")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 411 and b"Content-Length" in response.read()
    assert response.getheader("Connection", "").lower() == "close" or response.will_close


def test_a_body_the_server_does_not_read_never_becomes_the_next_request(server):
    # A chunked body to an unknown path: not read, so the connection closes after the reply.
    smuggled = b'POST /observe HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"users": ["x"], "items": [[1, 2, 3]]}'
    with socket.create_connection(server.server_address[:2], timeout=30) as raw:
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
        raw.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        replies = b""
        while data := raw.recv(65536):
            replies += data
    assert replies.count(b"HTTP/1.1 ") == 1 and b" 404 " in replies and b"Connection: close" in replies
    assert call(connect(server), "POST", "/recommend", {"users": ["x"], "k": 3})[0] == 404  # x never observed
    # A GET with a body: the body is read, and the connection serves the next request.
    conn = connect(server)
    assert call(conn, "GET", "/health", b'{"users": ["y"]}')[0] == 200
    assert call(conn, "GET", "/health")[0] == 200


def test_an_unexpected_failure_is_a_500_reply_not_a_dropped_connection(server, monkeypatch):
    from rec2pm.serving.recommender import Recommender as Served

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Served, "recommend", broken)
    status, reply = call(connect(server), "POST", "/recommend", {"users": ["a"], "k": 3})
    assert status == 500 and "RuntimeError: boom" in reply["error"]

    def lookup_failed(self, *args, **kwargs):  # a bug's KeyError is not an unknown user
        return {}["missing"]

    monkeypatch.setattr(Served, "recommend", lookup_failed)
    status, reply = call(connect(server), "POST", "/recommend", {"users": ["a"], "k": 3})
    assert status == 500 and "KeyError" in reply["error"]
