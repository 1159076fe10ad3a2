"""`flashlite serve` over real HTTP on the tiny_v4 fixture: answers equal the Python API's for the same seed, SSE
streams concatenate to them, the official openai client talks to it, bad fields get OpenAI-shaped 400s naming
them, concurrent requests interleave on one model, a client that leaves cancels its generation, and the command
itself starts, answers and stops on Ctrl-C."""
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from flashlite.server.app import MAX_BODY
from serving import serving

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
OTHER = [{"role": "user", "content": "Count to five."}]
LONG = 900  # tokens a greedy answer runs for unless cancelled: seconds of work on the tiny model
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


@pytest.fixture
def answers():
    """The server's log records of finished answers (finish_reason, usage), as they are logged."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record) if hasattr(record, "finish_reason") else None
    logger = logging.getLogger("flashlite.server")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def call(server, method, path, body=None, headers=None):
    """(status, response, decoded JSON or raw bytes) of one request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    if response.getheader("Content-Type") == "application/json":
        return response.status, response, json.loads(raw)
    return response.status, response, raw


def events(raw: bytes) -> list:
    """Parsed `data:` events of an SSE body; the final `[DONE]` as a string."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def counts(usage: dict) -> dict:
    """The token counts of a usage dict; how many prompt tokens came from a kept cache depends on the requests
    that ran before on the same server."""
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def joined(chunks, key):
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks)


def test_health_models_and_unknown_routes(server, model):
    assert call(server, "GET", "/health")[::2] == (200, {"status": "ok"})
    status, _, listing = call(server, "GET", "/v1/models")
    assert status == 200 and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [model.file.get("general.name")] == ["tiny_v4"]
    assert call(server, "GET", "/v1/models/tiny_v4")[2]["id"] == "tiny_v4"
    status, _, body = call(server, "GET", "/v1/models/gpt-4o")
    assert status == 404 and body["error"]["param"] == "model"
    status, _, body = call(server, "GET", "/v1/embeddings")
    assert status == 404 and set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "not_found"
    status, _, body = call(server, "GET", "/v1/chat/completions")
    assert status == 405 and set(body["error"]) == ERROR_KEYS


@pytest.mark.parametrize("fields, think", [({}, "none"), ({"reasoning_effort": "medium"}, "high"),
                                           ({"think": "max"}, "max")])
def test_answer_equals_the_python_api_for_the_same_seed(server, model, fields, think):
    status, _, got = call(server, "POST", "/v1/chat/completions",
                          {"model": "tiny_v4", "messages": MESSAGES, "seed": 11, "max_tokens": 24, **fields})
    expected = model.create_chat_completion(MESSAGES, seed=11, max_tokens=24, think=think)
    assert status == 200 and got["object"] == "chat.completion" and got["model"] == "tiny_v4"
    assert got["choices"] == expected["choices"] and counts(got["usage"]) == counts(expected["usage"])
    assert (got["choices"][0]["message"]["reasoning_content"] is not None) == (think != "none")


def test_text_parts_tools_and_tool_history_reach_the_prompt(server, model):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                                "parameters": {"type": "object",
                                                               "properties": {"word": {"type": "string"}}}}}]
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "red"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a colour"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]}]
    for sent, used, extra in [(history, history, {"tools": tools}),
                              (parts + MESSAGES[1:], [{"role": "system", "content": "Be\nbrief."}] + MESSAGES[1:], {})]:
        status, _, got = call(server, "POST", "/v1/chat/completions",
                              {"messages": sent, "seed": 4, "max_tokens": 12, **extra})
        expected = model.create_chat_completion(used, seed=4, max_tokens=12, **extra)
        assert status == 200
        assert counts(got["usage"]) == counts(expected["usage"]) and got["choices"] == expected["choices"]


@pytest.mark.parametrize("think", [None, "high"])
def test_stream_chunks_concatenate_to_the_answer(server, model, think):
    body = {"messages": MESSAGES, "seed": 3, "max_tokens": 30, "think": think}
    status, response, raw = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    *chunks, done = events(raw)
    assert done == "[DONE]"
    whole = model.create_chat_completion(MESSAGES, seed=3, max_tokens=30, think=think or "none")
    message = whole["choices"][0]["message"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert joined(chunks, "content") == (message["content"] or "")
    assert joined(chunks, "reasoning_content") == (message["reasoning_content"] or "")
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert counts(chunks[-1]["usage"]) == counts(whole["usage"])


def test_a_growing_conversation_reuses_its_cached_prefix(server, model):
    """The second request of a conversation (the first's messages plus an answer and a question) prefills only
    what the server's caches do not hold, and still answers as the Python API does from scratch."""
    first = [{"role": "user", "content": "Describe the sea in many words. " * 8}]
    status, _, one = call(server, "POST", "/v1/chat/completions", {"messages": first, "max_tokens": 4, "seed": 3})
    assert status == 200
    second = first + [{"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "Shorter?"}]
    before = model.stats()["tokens"]
    status, _, two = call(server, "POST", "/v1/chat/completions", {"messages": second, "max_tokens": 4, "seed": 3})
    fed = model.stats()["tokens"] - before
    assert status == 200
    assert fed < two["usage"]["prompt_tokens"] // 2
    usage = two["usage"]  # fed: the prompt's uncached part, then one forward per generated token but the last
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert fed == usage["prompt_tokens"] - cached + usage["completion_tokens"] - 1
    assert two["choices"] == model.create_chat_completion(second, max_tokens=4, seed=3)["choices"]
    assert counts(two["usage"]) == counts(model.create_chat_completion(second, max_tokens=4, seed=3)["usage"])


def test_openai_client_in_both_modes(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny_v4"]
    expected = model.create_chat_completion(MESSAGES, seed=5, max_tokens=20, think="high")
    message = expected["choices"][0]["message"]
    out = client.chat.completions.create(model="tiny_v4", messages=MESSAGES, seed=5, max_tokens=20,
                                         reasoning_effort="high")
    assert out.choices[0].message.content == message["content"]
    assert out.choices[0].message.model_extra["reasoning_content"] == message["reasoning_content"]
    assert out.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert counts(out.usage.model_dump()) == counts(expected["usage"])
    stream = client.chat.completions.create(model="tiny_v4", messages=MESSAGES, seed=5, max_completion_tokens=20,
                                            stream=True, extra_body={"think": "high"})
    chunks = [c.model_dump() for c in stream]
    assert joined(chunks, "content") == (message["content"] or "")
    assert joined(chunks, "reasoning_content") == message["reasoning_content"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny_v4", messages=MESSAGES, top_p=1.5)
    assert error.value.status_code == 400 and error.value.param == "top_p"


@pytest.mark.parametrize("fields, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"seed": -5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"think": "high", "reasoning_effort": "none"}, "think"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_field_is_a_400_naming_it(server, fields, param):
    status, _, body = call(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, **fields})
    assert status == 400 and set(body["error"]) == ERROR_KEYS
    assert body["error"]["param"] == param and body["error"]["message"].startswith(param)
    assert body["error"]["type"] == "invalid_request_error"
    assert (body["error"]["code"] == "context_length_exceeded") == ("word " in json.dumps(fields))


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"messages": NaN}', "\xff".encode("latin-1")])
def test_malformed_body_is_a_400(server, body):
    status, _, answer = call(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and set(answer["error"]) == ERROR_KEYS and "Traceback" not in answer["error"]["message"]


def test_oversized_body_is_a_413_before_it_is_read(server):
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        reply = sock.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_failure_inside_is_a_500_without_its_details(server, model, monkeypatch):
    def broken(messages, **kwargs):  # model.chat whose pieces fail before the first
        def pieces():
            raise RuntimeError("secret internals")
            yield

        return pieces()

    monkeypatch.setattr(model, "chat", broken)
    status, _, body = call(server, "POST", "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in json.dumps(body)
    status, _, raw = call(server, "POST", "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    first, error = events(raw)  # the role goes out at once, the failure after it
    assert status == 200 and first["choices"][0]["delta"]["role"] == "assistant"
    assert error["error"]["type"] == "server_error" and b"secret" not in raw


def test_api_key_guards_the_v1_routes(model):
    with serving(model, api_key="s3cret") as server:
        assert call(server, "GET", "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _, body = call(server, "GET", "/v1/models", headers=headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="tiny_v4", messages=MESSAGES, max_tokens=2).usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_concurrent_requests_interleave_on_one_model(server, model):
    """A long answer and a streamed one at once: the stream's first text arrives while the long one still runs,
    and both equal what they are alone."""
    results = {}

    def long_answer():
        results["long"] = call(server, "POST", "/v1/chat/completions",
                               {"messages": OTHER, "temperature": 0, "max_tokens": 400})
        results["long_done"] = time.perf_counter()

    thread = threading.Thread(target=long_answer)
    thread.start()
    time.sleep(0.2)
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES, "seed": 9, "max_tokens": 20,
                                                             "stream": True}))
    response = conn.getresponse()
    first_text = None
    raw = b""
    while line := response.readline():
        raw += line
        if first_text is None and b'"content": "' in line and b'"content": ""' not in line:
            first_text = time.perf_counter()
    conn.close()
    thread.join()
    assert first_text is not None and first_text < results["long_done"]
    alone = model.create_chat_completion(OTHER, temperature=0, max_tokens=400)
    assert results["long"][2]["choices"] == alone["choices"]
    assert results["long"][2]["usage"]["completion_tokens"] == 400
    *chunks, _ = events(raw)
    assert joined(chunks, "content") == model.create_chat_completion(
        MESSAGES, seed=9, max_tokens=20)["choices"][0]["message"]["content"]


def _finished(answers, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while not answers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert answers, "the server logged no finished answer"
    return answers[0]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(server, answers, stream):
    body = json.dumps({"messages": MESSAGES, "temperature": 0, "max_tokens": LONG, "stream": stream}).encode()
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
        else:
            time.sleep(0.3)
    record = _finished(answers)
    assert record.finish_reason == "cancelled"
    assert 0 < record.usage["completion_tokens"] < LONG


def test_closing_the_server_ends_a_stream_with_cancelled(model):
    with serving(model) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"messages": MESSAGES, "temperature": 0, "max_tokens": LONG, "stream": True}))
        response = conn.getresponse()
        first = response.readline()
    *chunks, done = events(first + response.read())
    conn.close()
    assert done == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert chunks[-1]["usage"]["completion_tokens"] < LONG


def test_api_doc_client_example_runs(model):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.DOTALL)[-1]
    with serving(model, api_key="KEY") as server:
        code = code.replace("http://127.0.0.1:8080", server.url)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             check=False)
    assert run.returncode == 0, run.stderr
    assert "completion_tokens=" in run.stdout


def test_serve_command_answers_and_stops_on_ctrl_c(f32_gguf, model):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flashlite.cli", "serve", "-m", str(f32_gguf), "--port", "0", "--api-key", "k"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", banner).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        out = client.chat.completions.create(model="tiny_v4", messages=MESSAGES, temperature=0, max_tokens=8)
        expected = model.create_chat_completion(MESSAGES, temperature=0, max_tokens=8)
        assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
        taken = subprocess.run(command[:-4] + ["--port", url.rsplit(":", 1)[1]], capture_output=True, text=True,
                               env=env, timeout=60, check=False)
        assert taken.returncode == 1 and "cannot listen" in taken.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "shutting down" in err and "Traceback" not in err
