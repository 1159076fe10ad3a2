"""What a request may cost is bounded before it is spent (issue 16): bodies refused by their length or as they
arrive, JSON depth counted before parsing, prompts checked against the context before they are tokenized
through, a cap on open connections, a time limit on a request's head (slowloris), its body and idle keep-alive
connections; and tools/load_server.py, run briefly."""
import http.client
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from flashlite.server.app import MAX_BODY
from flashlite.server.requests import json_depth
from serving import serving

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(model):
    with serving(model, idle_timeout=1.0) as s:
        yield s


def post(server, body: bytes, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def reply_of(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """What the server sends until it closes the connection (or limit_s passes)."""
    sock.settimeout(limit_s)
    got = b""
    try:
        while part := sock.recv(65536):
            got += part
    except (ConnectionResetError, socket.timeout):
        pass
    return got


class BpeSpy:
    """Records the length of every piece the tokenizer merges."""

    def __init__(self, tokenizer, monkeypatch):
        self.longest = 0
        bpe = tokenizer._bpe

        def spy(piece):
            self.longest = max(self.longest, len(piece))
            return bpe(piece)

        monkeypatch.setattr(tokenizer, "_bpe", spy)


def test_the_default_body_limit_follows_the_context(server, model):
    assert server.max_body == 65536 + 6 * model.tokenizer.max_token_bytes * model.ctx < MAX_BODY


def test_a_31_mb_body_of_spaces_is_refused_at_once(server):
    """By its Content-Length, before a byte of it is read; and sent without a length, as soon as it passes the
    limit: the server stops reading and answers while most of it is still unsent."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (31 << 20))
        sock.sendall(b'{"messages": [{"role": "user", "content": "' + b" " * 65536)
        reply = reply_of(sock)
    assert reply.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"

    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sent, reply = 0, b""
        sock.settimeout(0.05)
        block = b" " * 65536
        while sent < 31 << 20:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if reply:
                break
        reply += reply_of(sock, 5)
    assert reply.startswith(b"HTTP/1.1 413") and sent < 4 * server.max_body


def test_a_prompt_past_the_context_is_refused_before_it_is_tokenized(server, model, monkeypatch):
    spy = BpeSpy(model.tokenizer, monkeypatch)
    spaces = " " * (server.max_body - 1000)  # fits the body, not the context
    status, body = post(server, json.dumps({"messages": [{"role": "user", "content": spaces}]}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and spy.longest < 1000
    words = "word " * model.ctx  # many small pieces: tokenizing stops at the context
    status, body = post(server, json.dumps({"prompt": words}).encode(), "/v1/completions")
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_a_31_mb_prompt_of_spaces_in_a_body_the_server_takes_is_a_400_without_tokenizing(model, monkeypatch):
    """With the body limit raised to MAX_BODY (as for a large context), 31 MB of spaces in a message is read and
    parsed, but never merged: it cannot fit the context."""
    spy = BpeSpy(model.tokenizer, monkeypatch)
    body = json.dumps({"messages": [{"role": "user", "content": " " * (31 << 20)}]}).encode()
    with serving(model, max_body=MAX_BODY) as big:
        started = time.monotonic()
        status, answer = post(big, body)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert spy.longest < 1000 and time.monotonic() - started < 30


def test_json_nested_100000_deep_is_a_400_before_it_is_parsed(server):
    status, body = post(server, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested" in body["error"]["message"]
    deep = {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    inner = deep["tools"][0]["function"]["parameters"]
    for _ in range(70):
        inner["x"] = {}
        inner = inner["x"]
    status, body = post(server, json.dumps(deep).encode())
    assert status == 400 and "nested" in body["error"]["message"]
    assert json_depth(b'{"a": "[[[[[[", "b": [[{"c": "]]]]\\"[["}]]}') == 4


def test_a_slow_head_an_idle_connection_and_a_slow_body_are_cut_off(server):
    """idle_timeout (1 s here) bounds the time to send a request's head, a connection's idle time and a body's
    stalls; the server closes such connections itself."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:  # slowloris
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(20):
                time.sleep(0.25)
                sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            pass
        assert reply_of(sock) == b"" and time.monotonic() - started < 4
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:  # silent
        started = time.monotonic()
        assert reply_of(sock) == b"" and time.monotonic() - started < 4
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:  # idle after an answer
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        reply = reply_of(sock)
        assert reply.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 4
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:  # a body that stalls
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        started = time.monotonic()
        reply = reply_of(sock)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4


def test_open_connections_are_capped(model):
    with serving(model, max_connections=3, idle_timeout=30) as server:
        held = [socket.create_connection(server.server_address[:2], timeout=30) for _ in range(3)]
        try:
            time.sleep(0.2)
            with socket.create_connection(server.server_address[:2], timeout=30) as extra:
                reply = reply_of(extra)
            assert reply.startswith(b"HTTP/1.1 503") and b"connections" in reply
            held.pop().close()
            time.sleep(0.2)
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            for sock in held:
                sock.close()


def test_a_malformed_or_huge_head_is_a_json_400(server):
    for head in (b"NONSENSE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000):  # no end
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(head)
            reply = reply_of(sock)
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_load_tool_runs_bounded_on_loopback(f32_gguf, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import load_server
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        load_server.loopback("http://10.1.2.3:8080")
    report = load_server.main(["-m", str(f32_gguf), "--clients", "6", "--duration", "4", "--max-tokens", "2",
                               "--slow", "0.2", "--oversized", "0.3", "--idle-timeout", "1"])
    assert report["ok"] > 0 and report["failed"] == {} and report["non_200"] == 0
    assert report["rss_peak_mb"] > 0
    for kind, row in report["abuse"].items():
        assert row["max_s"] < 10, (kind, row)
        assert set(row["ended"]) <= {"400", "413", "408", "closed", "reset"}, (kind, row)
    assert "latency p50" in capsys.readouterr().out


def test_answers_are_not_held_back_by_nagle(server):
    """A head and its body are two writes; without TCP_NODELAY each answer would wait ~40 ms for the client's
    delayed ACK (50 requests: > 2 s)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    started = time.perf_counter()
    for _ in range(50):
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
    conn.close()
    assert time.perf_counter() - started < 1.5
