"""An OpenAI-compatible HTTP server over one loaded Model, on the standard library's ThreadingHTTPServer.

Routes: POST /v1/chat/completions (a JSON answer, or `text/event-stream` chunks ending in `data: [DONE]`),
GET /v1/models, GET /v1/models/{id}, GET /health. Each request decodes in a cache of its own; the forward passes of
concurrent requests take turns under Model.lock, and at most `parallel` requests generate at once while the others
wait for a slot. A client that closes its connection, while waiting or mid-answer, cancels its generation.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import selectors
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from flashlite.chat import check_messages, prompt_ids, shared_prefix, show

log = logging.getLogger("flashlite.server")

MAX_BODY = 32 << 20  # bytes; a prompt filling a 1M-token context is about 4 MB of text
THINK_MODES = ("none", "high", "max")
# V4 has one reasoning level below "max"; OpenAI's graded efforts all land on it
REASONING_EFFORTS = {"none": "none", "minimal": "high", "low": "high", "medium": "high", "high": "high",
                     "xhigh": "max", "max": "max"}
SAMPLING_NUMBERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}


class RequestError(Exception):
    """A request the server answers with an OpenAI-shaped error instead of a completion."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection; there is nobody left to answer."""


@dataclass
class ChatRequest:
    messages: list[dict]
    stream: bool
    options: dict  # keyword arguments of Model.create_chat_completion


def _typed(body: dict, name: str, kind: type):
    """body[name] as `kind` (None when absent or null); an integral float passes as an int, a bool as nothing else."""
    value = body.get(name)
    if value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if (kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
            and (kind is float or float(value).is_integer())):
        return kind(value)
    what = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}[kind]
    raise RequestError(f"{name}: expected {what}, got {show(value)}", name)


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise RequestError("tools: expected an array of {\"type\": \"function\", \"function\": {\"name\", ...}}",
                           "tools")
    if choice not in (None, "auto", "none"):
        raise RequestError(f"tool_choice: only \"auto\" and \"none\" are supported, got {show(choice)}",
                           "tool_choice")
    return None if choice == "none" else tools or None


def _think(body: dict) -> str:
    modes = {}
    effort = _typed(body, "reasoning_effort", str)
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise RequestError(f"reasoning_effort: expected one of {', '.join(REASONING_EFFORTS)}, got {show(effort)}",
                               "reasoning_effort")
        modes["reasoning_effort"] = REASONING_EFFORTS[effort]
    think = body.get("think")
    if think is not None:
        if isinstance(think, bool):
            modes["think"] = "high" if think else "none"
        elif think in THINK_MODES:
            modes["think"] = think
        else:
            raise RequestError(f"think: expected true, false or one of {', '.join(THINK_MODES)}, got {show(think)}",
                               "think")
    if len(set(modes.values())) > 1:
        raise RequestError(f"think: {show(think)} contradicts reasoning_effort {show(effort)}", "think")
    return next(iter(modes.values()), "none")


def _unsupported(body: dict) -> None:
    """OpenAI fields that would change the answer and that this server does not implement: refused, not ignored."""
    n = _typed(body, "n", int)
    if n not in (None, 1):
        raise RequestError(f"n: only 1 choice per request is supported, got {n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _typed(body, name, float) not in (None, 0.0):
            raise RequestError(f"{name}: not supported (use repetition_penalty)", name)
    if _typed(body, "logprobs", bool) or body.get("top_logprobs"):
        raise RequestError("logprobs: not supported", "logprobs")
    if body.get("logit_bias"):
        raise RequestError("logit_bias: not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"response_format: only {{\"type\": \"text\"}} is supported, got {show(fmt)}",
                           "response_format")


def parse_chat_request(body) -> ChatRequest:
    """Check a /v1/chat/completions body; a bad field is a RequestError naming it. Ranges of the sampling numbers
    are left to flashlite.sampling, whose errors also name the field."""
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {show(body)}")
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as exc:
        raise _value_error(exc) from None
    _unsupported(body)
    _typed(body, "model", str)
    options = {"think": _think(body), "tools": _tools(body)}
    for name, kind in SAMPLING_NUMBERS.items():
        if (value := _typed(body, name, kind)) is not None:
            options[name] = value
    if (value := _typed(body, "repeat_penalty", float)) is not None:  # llama.cpp's name
        options["repetition_penalty"] = value
    seed = _typed(body, "seed", int)
    if seed is not None and seed < -1:
        raise RequestError(f"seed: expected an integer >= 0 (or -1 for a random one), got {seed}", "seed")
    options["seed"] = None if seed == -1 else seed
    limits = {name: _typed(body, name, int) for name in ("max_completion_tokens", "max_tokens")}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise RequestError(f"{name}: expected an integer >= 1, got {value}", name)
    if None not in limits.values() and len(set(limits.values())) > 1:
        raise RequestError("max_tokens: contradicts max_completion_tokens", "max_tokens")
    options["max_tokens"] = limits["max_completion_tokens"] or limits["max_tokens"]
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list)
                                 and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"stop: expected a string or an array of strings, got {show(stop)}", "stop")
    options["stop"] = stop
    stream = bool(_typed(body, "stream", bool))
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError("stream_options: expected an object", "stream_options")
    return ChatRequest(messages, stream, options)


def _value_error(exc: ValueError) -> RequestError:
    """A ValueError of the chat API as a 400; its messages start with the argument they are about."""
    head = str(exc).split(":", 1)[0]
    name = head.split("[", 1)[0]
    known = name in ("messages", "tools", "tool_calls", "stop", "max_tokens", "think", *SAMPLING_NUMBERS)
    too_long = head == "messages" and "context" in str(exc)
    return RequestError(str(exc), head if known else None, code="context_length_exceeded" if too_long else None)


class DisconnectWatch:
    """Sets `cancel` as soon as the client's side of the connection closes while its answer is being made.

    A readable socket with no bytes to peek is a closed one; bytes mean a pipelined next request, so the client is
    still there and the watch ends."""

    POLL_S = 0.05

    def __init__(self, sock: socket.socket, cancel: threading.Event):
        self._sock, self._cancel = sock, cancel
        self._over = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._watch, name="disconnect-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._over.set()  # the thread sees it within POLL_S; joining would add that latency to every answer

    def _watch(self) -> None:
        with selectors.DefaultSelector() as selector:  # not select.select: it fails on descriptors past 1023
            try:
                selector.register(self._sock, selectors.EVENT_READ)
                while not self._over.is_set():
                    if not selector.select(self.POLL_S):
                        continue
                    if self._sock.recv(1, socket.MSG_PEEK):
                        return
                    break
            except (OSError, ValueError):  # a reset connection, or one already closed
                pass
        if not self._over.is_set():
            self._cancel.set()


class ChatServer(ThreadingHTTPServer):
    """Serves one loaded Model. `api_key`, when set, must come as `Authorization: Bearer KEY` on the /v1 routes;
    `model_id` names the model in /v1/models and in every answer (default: the GGUF's general.name)."""

    daemon_threads = True

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 parallel: int = 4, model_id: str | None = None):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.model = model
        self.api_key = api_key
        self.model_id = model_id or model.file.get("general.name") or os.path.basename(model.file.path)
        self.created = int(time.time())
        self._slots = threading.BoundedSemaphore(parallel)
        # one decode cache per slot, kept between requests: a conversation's next request reuses its prefix
        self._free_caches = [model.new_cache() for _ in range(parallel)]
        self._running: set[threading.Event] = set()
        self._changed = threading.Condition()
        self._closing = threading.Event()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), ChatHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @contextmanager
    def slot(self, cancel: threading.Event, prompt: list[int]):
        """Hold one of the `parallel` generation slots and its cache, the free one sharing the longest prefix with
        the prompt's token ids; `cancel` is set when the server closes."""
        while not self._slots.acquire(timeout=DisconnectWatch.POLL_S):
            if self._closing.is_set():
                raise RequestError("the server is shutting down", status=503, kind="server_error")
            if cancel.is_set():
                raise ClientGone
        with self._changed:
            self._running.add(cancel)
            cache = max(self._free_caches, key=lambda c: shared_prefix(c, prompt))
            self._free_caches.remove(cache)
        try:
            if self._closing.is_set():
                cancel.set()
            yield cache
        finally:
            with self._changed:
                self._free_caches.append(cache)
                self._running.discard(cancel)
                self._changed.notify_all()
            self._slots.release()

    def server_close(self, wait_s: float = 5.0) -> None:
        """Stop listening, cancel the generations in flight and give them wait_s to send their last chunk."""
        self._closing.set()
        super().server_close()
        with self._changed:
            for cancel in self._running:
                cancel.set()
            self._changed.wait_for(lambda: not self._running, timeout=wait_s)


class ChatHandler(BaseHTTPRequestHandler):
    """One client connection: keep-alive HTTP/1.1, JSON answers with a length, streams chunked."""

    protocol_version = "HTTP/1.1"
    server_version = "flashlite"
    timeout = 600  # seconds a connection may sit idle, or a client stall a write, before it is dropped
    # the base class's own errors (a malformed request line, a header too long) in the OpenAI shape too
    error_content_type = "application/json"
    error_message_format = ('{"error": {"message": "%(message)s", "type": "invalid_request_error", "param": null, '
                            '"code": "%(code)d"}}')
    server: ChatServer

    def _handle(self) -> None:
        self._streaming = False
        self._body_left = self._content_length_hint()
        try:
            self._route()()
        except ClientGone:
            self.close_connection = True
        except RequestError as exc:
            self._fail(exc)
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self._fail(RequestError("internal server error", status=500, kind="server_error"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _route(self):
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/v1/models/"):
            table = {"GET": lambda: self._model(path[len("/v1/models/"):])}
        else:
            path = path.rstrip("/") or "/"
            table = {"/health": {"GET": self._health}, "/v1/models": {"GET": self._models},
                     "/v1/chat/completions": {"POST": self._chat}}.get(path)
        if table is None:
            raise RequestError(f"no route {self.command} {path}", status=404, code="not_found")
        if self.command not in table:
            raise RequestError(f"{path} takes {', '.join(table)}, not {self.command}", status=405,
                               code="method_not_allowed")
        if path != "/health":
            self._authorize()
        return table[self.command]

    def _authorize(self) -> None:
        if self.server.api_key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.server.api_key.encode()):
            raise RequestError("invalid or missing API key: send `Authorization: Bearer KEY`", status=401,
                               code="invalid_api_key")

    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _card(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "flashlite"}

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._card()]})

    def _model(self, model_id: str) -> None:
        if model_id != self.server.model_id:
            raise RequestError(f"model {model_id!r} is not loaded (this server has {self.server.model_id!r})",
                               "model", status=404, code="model_not_found")
        self._send_json(200, self._card())

    def _chat(self) -> None:
        request = parse_chat_request(self._read_json())
        cancel = threading.Event()
        started = time.perf_counter()
        model = self.server.model
        try:
            prompt = prompt_ids(model, request.messages, request.options["think"], request.options["tools"])
        except ValueError as exc:
            raise _value_error(exc) from None
        with DisconnectWatch(self.connection, cancel), self.server.slot(cancel, prompt) as cache:
            try:
                answer = model.create_chat_completion(request.messages, stream=request.stream, cancel=cancel,
                                                      cache=cache, **request.options)
            except ValueError as exc:
                raise _value_error(exc) from None
            if request.stream:
                self._stream(answer, cancel, started)
            else:
                answer["model"] = self.server.model_id
                self._log_answer(answer, started)
                self._send_json(200, answer)

    def _stream(self, chunks, cancel: threading.Event, started: float) -> None:
        """Send the chunks as server-sent events. After a failed write the rest of the generation is cancelled
        and drained unsent, so its end is still logged."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        alive = True
        last = None
        for chunk in chunks:
            chunk["model"] = self.server.model_id
            last = chunk
            if alive:
                try:
                    self._write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                except ClientGone:
                    alive = False
                    cancel.set()
        self._log_answer(last, started)
        if not alive:
            raise ClientGone
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _log_answer(self, answer: dict, started: float) -> None:
        usage, finish = answer["usage"], answer["choices"][0]["finish_reason"]
        log.info("%s %s: %d prompt + %d completion tokens in %.2f s, finish %s", self.address_string(),
                 answer["id"], usage["prompt_tokens"], usage["completion_tokens"], time.perf_counter() - started,
                 finish, extra={"finish_reason": finish, "usage": usage})

    def _content_length_hint(self) -> int:
        try:
            return max(int(self.headers.get("Content-Length", "0")), 0)
        except ValueError:
            return 0

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("send the body with a Content-Length, not chunked", status=411, code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(f"Content-Length: not a number: {self.headers['Content-Length']!r}") from None
        if length < 0:
            raise RequestError(f"Content-Length: negative: {length}")
        if length > MAX_BODY:
            raise RequestError(f"the body is {length} bytes, more than the {MAX_BODY} this server takes",
                               status=413, code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ClientGone
        self._body_left = 0
        try:
            return json.loads(raw, parse_constant=self._no_constant)
        except ValueError as exc:  # bad UTF-8, bad JSON, NaN / Infinity
            raise RequestError(f"the body is not valid JSON: {exc}") from None

    @staticmethod
    def _no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            raise ClientGone from None

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            raise ClientGone from None

    def _fail(self, exc: RequestError) -> None:
        log.log(logging.ERROR if exc.status >= 500 else logging.INFO, "%s %s %s -> %d: %s", self.address_string(),
                self.command, self.path, exc.status, exc.message)
        try:
            if self._streaming:  # the 200 is already out: the error becomes the stream's last event
                self.close_connection = True
                self._write_chunk(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
                self._write_chunk(b"")
                return
            if self._body_left:  # the unread body would be taken for the next request
                self.close_connection = True
            self._send_json(exc.status, exc.body())
        except ClientGone:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)
