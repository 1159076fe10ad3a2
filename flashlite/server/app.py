"""The HTTP server over one loaded Model: OpenAI's and Anthropic's APIs on uvicorn + Starlette (ASGI).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}] (OpenAI); POST /v1/messages,
POST /v1/messages/count_tokens (Anthropic); POST /tokenize, POST /detokenize, GET /health, GET /metrics
(Prometheus text). HEAD works wherever GET does. Streams are server-sent events: OpenAI's `data:` chunks ending
in `data: [DONE]`, Anthropic's named events.

The event loop only parses HTTP and moves bytes: request bodies are checked and tokenized in a small thread pool,
and each answer is generated in a thread of its own (its forward passes take Model.lock, so concurrent answers
interleave token by token). At most `parallel` answers generate at once, each in one of `parallel` decode caches
kept between requests: a request gets the free cache sharing the longest prefix with its prompt, so a
conversation's next turn prefills only what is new. Others wait for a slot. A client that disconnects, while
waiting or mid-answer, cancels its generation.

What a request may cost is bounded before it is spent: the body (by its Content-Length, else as it arrives: at
most what a prompt filling the context can take as JSON), its JSON nesting depth (counted before it is parsed),
the prompt's tokens (a text of n bytes is at least n / longest-token tokens, checked before tokenizing, and
tokenizing stops at the context), open connections (more are answered 503 and closed), the time a connection may
take to send a request's head or sit idle, a body's pace (MIN_BODY_RATE after idle_timeout) and total time, and
the time a client may take to accept a part of the answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flashlite.chat.completion import ChatPiece, _chunks, _completion, _decode, check_messages
from flashlite.chat.sampling import Sampler
from flashlite.chat.template import BOS, encode_messages
from flashlite.server import anthropic_api
from flashlite.server.anthropic_api import AnthropicError
from flashlite.server.requests import (MAX_DEPTH, SAMPLING_NUMBERS, ClientGone, RequestError, internal_error,
                                       parse_chat_request, parse_completion_request, parse_json, typed_field,
                                       value_error)
from flashlite.server.serving import (Clock, Job, Metrics, RawRouter, Silent, Slots, Uvicorn, Watch,
                                      anthropic_error_frame, anthropic_frame, guarded_protocol, json_response,
                                      openai_error_frame, openai_frame, respond_events, respond_json)
from flashlite.speculative import SpecOptions

log = logging.getLogger("flashlite.server")

MAX_BODY = 32 << 20  # bytes, whatever the context: a prompt filling a 1M-token context is about 4 MB of text
JSON_ESCAPE = 6  # bytes of JSON one byte of text may take (`\u00XX`)
BODY_SLACK = 1 << 16  # bytes of a body besides its prompt text (field names, sampling options)
MIN_BODY_RATE = 16 << 10  # bytes / s a body must average, after idle_timeout to start


# ---- the server ----------------------------------------------------------------------------------------------------

class ChatServer:
    """Serves one loaded Model over HTTP on host:port (bound at once; port 0 takes a free one).

    `api_key`, when set, must come as `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but /health.
    `model_id` names the model in /v1/models and in every answer (default: the GGUF's general.name). `parallel`
    answers generate at once. Limits: `max_connections` open connections; `idle_timeout` seconds for a connection
    to send a request's head, or to sit idle between requests, or for a body to make progress; `timeout` seconds
    for a whole body to arrive or for a client to take a part of the answer; `max_body` bytes (default: what a
    prompt filling the context may take as JSON, at most MAX_BODY); `max_depth` JSON nesting.

    serve_forever() runs it in the calling thread until shutdown() (from another thread) or, with
    handle_signals, SIGINT / SIGTERM; answers in flight then end with finish reason "cancelled"."""

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 parallel: int = 4, model_id: str | None = None, max_connections: int = 256,
                 idle_timeout: float = 15.0, timeout: float = 600.0, max_body: int | None = None,
                 max_depth: int = MAX_DEPTH):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not idle_timeout > 0 or not timeout > 0:
            raise ValueError(f"timeouts must be > 0 s, got idle {idle_timeout}, timeout {timeout}")
        self.model = model
        self.api_key = api_key
        self.model_id = model_id or model.file.get("general.name") or os.path.basename(model.file.path)
        self.created = int(time.time())
        self.max_connections, self.idle_timeout, self.timeout = max_connections, idle_timeout, timeout
        text_bytes = model.tokenizer.max_token_bytes * model.ctx
        self.max_body = min(MAX_BODY, BODY_SLACK + JSON_ESCAPE * text_bytes) if max_body is None else max_body
        self.max_depth = max_depth
        # one decode cache per slot, kept between requests: a conversation's next request reuses its prefix
        self.slots = Slots([model.new_cache() for _ in range(parallel)])
        self.metrics = Metrics()
        self.stopped_by_signal = None
        self._running: set[threading.Event] = set()
        self._generators = ThreadPoolExecutor(parallel, thread_name_prefix="flashlite-generate")
        self._workers = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="flashlite-prepare")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(self._app(), http=guarded_protocol(self), ws="none", lifespan="off",
                                log_config=None, access_log=False, loop="asyncio", server_header=False,
                                headers=[("server", "flashlite")], timeout_keep_alive=max(1, int(idle_timeout)),
                                timeout_graceful_shutdown=10)
        self._uvicorn = Uvicorn(config, self)
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self, handle_signals: bool = False) -> None:
        """Serve until shutdown() or, with handle_signals (main thread only), SIGINT / SIGTERM."""
        self._uvicorn.take_signals = handle_signals
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread): stop listening, cancel the answers in flight, give them
        time to send their last part, and return when it has returned."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        """Release what is left (the listening socket, the worker threads)."""
        self._begin_close()
        self.socket.close()
        self._workers.shutdown(wait=False)
        self._generators.shutdown(wait=False)

    def open_connections(self) -> int:
        return len(self._uvicorn.server_state.connections)

    def _begin_close(self) -> None:
        self.slots.close()
        for cancel in list(self._running):
            cancel.set()

    # -- plumbing --

    async def _take_slot(self, prompt: list[int], watch: Watch):
        cache = self.slots.try_take(prompt)
        if cache is not None:
            return cache
        take = asyncio.ensure_future(self.slots.take(prompt))
        gone = asyncio.ensure_future(watch.gone.wait())
        try:
            await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if take.done():
            return take.result()
        take.cancel()
        with contextlib.suppress(asyncio.CancelledError, RequestError):
            self.slots.give_back(await take)  # given a slot at the same moment
        raise ClientGone

    async def _run_in_thread(self, cache, work, cancel: threading.Event):
        """The items `work(cache, cancel)` yields in a generation thread, as they come; the slot is given back
        when the thread is done with its cache, before the last item is seen."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(*message) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, message)
            except RuntimeError:  # the loop has closed: nobody waits for the answer
                cancel.set()

        def target() -> None:
            self._running.add(cancel)
            try:
                for item in work(cache, cancel):
                    post(0, item)
            except BaseException as exc:  # noqa: BLE001 - handed to the request's task
                end = (1, exc)
            else:
                end = (2, None)
            finally:
                self._running.discard(cancel)
                try:
                    loop.call_soon_threadsafe(self.slots.give_back, cache)
                except RuntimeError:
                    pass
            post(*end)

        loop.run_in_executor(self._generators, target)
        try:
            while True:
                kind, item = await queue.get()
                if kind == 2:
                    return
                if kind == 1:
                    raise item
                yield item
        finally:
            cancel.set()  # a consumer that stops early ends the generation (a finished one is unaffected)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused (413) as soon as it is known to be larger than max_body; a body that
        stalls for idle_timeout, arrives slower than MIN_BODY_RATE or takes longer than timeout is a 408."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(f"Content-Length: not a number: {length!r}", close=True)
            if int(length) > self.max_body:
                raise RequestError(f"the body is {int(length)} bytes, more than the {self.max_body} this server "
                                   "takes", status=413, code="request_too_large", close=True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        parts, size, more = [], 0, True
        while more:
            # idle_timeout to start, then MIN_BODY_RATE on average (a body dribbled in stops early), timeout in all
            deadline = start + min(self.timeout, self.idle_timeout + size / MIN_BODY_RATE)
            wait = min(self.idle_timeout, deadline - loop.time())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(request.receive(), wait)
            except asyncio.TimeoutError:
                raise RequestError("the body came too slowly", status=408, code="request_timeout",
                                   close=True) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body:
                raise RequestError(f"the body is more than the {self.max_body} bytes this server takes",
                                   status=413, code="request_too_large", close=True)
            parts.append(part)
            more = message.get("more_body", False)
        return b"".join(parts)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise RequestError("invalid or missing API key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`)",
                               status=401, code="invalid_api_key")

    def _prompt_ids(self, messages: list[dict], think: str, tools: list[dict] | None) -> list[int]:
        """The prompt's token ids, as chat() will feed them; a prompt that cannot fit the context is refused
        before it is tokenized through (see Tokenizer.encode's limit)."""
        try:
            text = encode_messages(check_messages(messages), think=think, tools=tools)
        except ValueError as exc:
            raise value_error(exc) from None
        return self._bounded(text, "messages")

    def _bounded(self, text: str, name: str) -> list[int]:
        ids = self.model.tokenizer.encode(text, limit=self.model.ctx - 1)
        if ids is None:
            raise RequestError(f"{name}: the prompt is more than {self.model.ctx - 1} tokens, the context holds "
                               f"{self.model.ctx}", name, code="context_length_exceeded")
        return ids

    def _answered(self, request: Request, answer_id: str, clock: Clock) -> None:
        usage, finish = clock.usage(), clock.done.finish_reason
        self.metrics.answered(usage, finish, clock.started, clock.first, clock.ended)
        client = request.client
        log.info("%s %s: %d prompt + %d completion tokens in %.2f s, finish %s",
                 f"{client[0]}:{client[1]}" if client else "-", answer_id, usage["prompt_tokens"],
                 usage["completion_tokens"], clock.ended - clock.started, finish,
                 extra={"finish_reason": finish, "usage": usage})

    def _spec(self, fields: dict) -> SpecOptions | None:
        """A request's speculation: its speculative.* fields over the server's defaults (None: no such fields, the
        defaults). A drafter that needs a draft GGUF takes the server's (-md): a request cannot name a file."""
        if not fields:
            return None
        default = self.model.speculation
        kind = fields.get("type", default.type)
        draft = None
        if kind in ("mtp", "dspark"):
            if default.type != kind:
                raise RequestError(f"speculative.type: {kind!r} needs its draft GGUF, which this server was not "
                                   f"started with (flashlite serve --spec-type {kind} -md FILE)", "speculative.type")
            draft = default.draft
        return SpecOptions(kind, fields.get("n_max", default.n_max), draft)

    # -- routes --

    def _app(self) -> Starlette:
        def route(path, endpoint, methods, public=False, anthropic=False):
            async def handle(request: Request) -> Response:
                try:
                    if not public:
                        self._authorize(request)
                    return await endpoint(request)
                except ClientGone:
                    return Silent()
                except AnthropicError as exc:
                    return json_response(400, RequestError(str(exc), exc.param).body(anthropic))
                except RequestError as exc:
                    log.log(logging.ERROR if exc.status >= 500 else logging.INFO, "%s %s -> %d: %s",
                            request.method, request.url.path, exc.status, exc.message)
                    return json_response(exc.status, exc.body(anthropic), exc.close)
                except Exception:
                    log.exception("%s %s failed", request.method, request.url.path)
                    return json_response(500, internal_error().body(anthropic))
            return Route(path, handle, methods=methods)

        async def http_error(request: Request, exc: HTTPException) -> Response:
            path = request.url.path
            if exc.status_code == 405:
                error = RequestError(f"{path} takes {exc.headers.get('Allow', '')}, not {request.method}",
                                     status=405, code="method_not_allowed")
            elif exc.status_code == 404:
                error = RequestError(f"no route {request.method} {path}", status=404, code="not_found")
            else:
                error = RequestError(str(exc.detail), status=exc.status_code)
            return json_response(error.status, error.body(path.startswith("/v1/messages")))

        routes = [
            route("/health", self._health, ["GET"], public=True),
            route("/v1/health", self._health, ["GET"], public=True),
            route("/metrics", self._metrics, ["GET"]),
            route("/v1/models", self._models, ["GET"]),
            route("/v1/models/{model_id:path}", self._model, ["GET"]),
            route("/v1/chat/completions", self._chat, ["POST"]),
            route("/v1/completions", self._completions, ["POST"]),
            route("/v1/messages", self._messages, ["POST"], anthropic=True),
            route("/v1/messages/count_tokens", self._count_tokens, ["POST"], anthropic=True),
            route("/tokenize", self._tokenize, ["POST"]),
            route("/detokenize", self._detokenize, ["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
        known = {r.path for r in routes}
        metrics = self.metrics

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = 0

            async def send_counted(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_counted)
            finally:
                path = scope["path"]
                label = path if path in known else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
                metrics.responded(label, status)

        return counted

    async def _health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(self), media_type="text/plain; version=0.0.4")

    def _card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashlite",
                "meta": {"n_ctx": self.model.ctx, "n_vocab": self.model.vocab_size}}

    async def _models(self, request: Request) -> Response:
        return json_response(200, {"object": "list", "data": [self._card()]})

    async def _model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_id:
            raise RequestError(f"model {model_id!r} is not loaded (this server has {self.model_id!r})",
                               "model", status=404, code="model_not_found")
        return json_response(200, self._card())

    async def _chat(self, request: Request) -> Response:
        def prepare(raw: bytes):
            chat = parse_chat_request(parse_json(raw, self.max_depth))
            spec = self._spec(chat.speculation)
            return chat, spec, self._prompt_ids(chat.messages, chat.options["think"], chat.options["tools"])

        chat, spec, prompt = await self._in_worker(prepare, await self._body(request))
        model = self.model
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}

        def work(cache, cancel):
            clock = Clock(time.perf_counter())
            try:
                pieces = model.chat(chat.messages, stream=True, cancel=cancel, cache=cache, spec_type=spec,
                                    **chat.options)
            except ValueError as exc:
                raise value_error(exc) from None
            pieces = self._pieces(request, pieces, clock, head["id"])
            if chat.stream:
                for chunk in _chunks(pieces, head):
                    if "usage" in chunk:  # the last: the answer is done
                        chunk["timings"] = clock.timings()
                    yield chunk
            else:
                yield {**_completion(pieces, head), "timings": clock.timings()}

        if chat.stream:
            return Job(self, prompt, work, respond_events(openai_frame, b"data: [DONE]\n\n", openai_error_frame))
        return Job(self, prompt, work, respond_json)

    def _pieces(self, request: Request, pieces, clock: Clock, answer_id: str):
        """Pass chat pieces on, timing them on `clock` and accounting for the answer at the `done` piece (before
        passing it on, so that what the done piece becomes can carry the clock's timings)."""
        for piece in pieces:
            if clock.first is None:
                clock.first = time.perf_counter()
            if piece.kind == "done":
                clock.ended, clock.done = time.perf_counter(), piece
                self._answered(request, answer_id, clock)
            yield piece

    async def _completions(self, request: Request) -> Response:
        tokenizer = self.model.tokenizer

        def prepare(raw: bytes):
            prompt, stream, options = parse_completion_request(parse_json(raw, self.max_depth), tokenizer)
            if isinstance(prompt, str):
                ids = self._bounded(prompt if prompt.startswith(BOS) else BOS + prompt, "prompt")
            elif len(prompt) >= self.model.ctx:
                raise RequestError(f"prompt: the prompt is {len(prompt)} tokens, the context holds {self.model.ctx}",
                                   "prompt", code="context_length_exceeded")
            else:
                ids = prompt
            try:
                sampler = Sampler(**{k: options[k] for k in (*SAMPLING_NUMBERS, "seed") if k in options})
                router = RawRouter(tokenizer, options["stop"], options["max_tokens"])
            except ValueError as exc:
                raise value_error(exc) from None
            return ids, stream, sampler, router, self._spec(options["speculation"])

        ids, stream, sampler, router, spec = await self._in_worker(prepare, await self._body(request))
        model = self.model
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id}

        def work(cache, cancel):
            clock = Clock(time.perf_counter())
            options = model.spec_options(spec)  # the request's, else the server's defaults
            pieces = self._pieces(request, _decode(model, model.lock, ids, sampler, router, cancel, cache, options),
                                  clock, head["id"])
            if stream:
                for piece in pieces:
                    if piece.kind == "done":
                        yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": piece.finish_reason}], "usage": _usage(piece),
                               "timings": clock.timings()}
                    elif piece.text:
                        yield {**head, "choices": [{"index": 0, "text": piece.text, "logprobs": None,
                                                    "finish_reason": None}]}
                return
            pieces = list(pieces)
            done = pieces[-1]
            yield {**head, "choices": [{"index": 0, "text": "".join(p.text for p in pieces[:-1]), "logprobs": None,
                                        "finish_reason": done.finish_reason}], "usage": _usage(done),
                   "timings": clock.timings()}

        if stream:
            return Job(self, ids, work, respond_events(openai_frame, b"data: [DONE]\n\n", openai_error_frame))
        return Job(self, ids, work, respond_json)

    def _parse_messages(self, raw: bytes, counting: bool):
        try:
            body = parse_json(raw, self.max_depth)
            request = anthropic_api.parse_messages_request(body, counting)
        except AnthropicError as exc:
            raise RequestError(str(exc), exc.param) from None
        return request, self._prompt_ids(request.messages, request.think, request.tools)

    async def _messages(self, request: Request) -> Response:
        spec, prompt = await self._in_worker(self._parse_messages, await self._body(request), False)
        model, model_id = self.model, self.model_id
        decode = model.tokenizer.decode
        answer_id = anthropic_api.new_id()

        def work(cache, cancel):
            clock = Clock(time.perf_counter())
            try:
                pieces = model.chat(spec.messages, think=spec.think, stream=True, cancel=cancel, tools=spec.tools,
                                    max_tokens=spec.max_tokens, stop=spec.stop or None, cache=cache, **spec.sampling)
            except ValueError as exc:
                raise value_error(exc) from None
            pieces = self._pieces(request, pieces, clock, answer_id)
            if spec.stream:
                yield from anthropic_api.message_events(pieces, spec, model_id, decode, len(prompt))
            else:
                yield anthropic_api.message(pieces, spec, model_id, decode)

        if spec.stream:
            return Job(self, prompt, work, respond_events(anthropic_frame, None, anthropic_error_frame),
                        anthropic=True)
        return Job(self, prompt, work, respond_json, anthropic=True)

    async def _count_tokens(self, request: Request) -> Response:
        def count(raw: bytes) -> int:
            return len(self._parse_messages(raw, True)[1])  # refused past the context, as /v1/messages would be

        return json_response(200, {"input_tokens": await self._in_worker(count, await self._body(request))})

    async def _tokenize(self, request: Request) -> Response:
        tokenizer = self.model.tokenizer

        def tokenize(raw: bytes) -> dict:
            body = parse_json(raw, self.max_depth)
            if not isinstance(body, dict) or not isinstance(body.get("content"), str):
                raise RequestError("content: expected a string", "content")
            add_special = bool(typed_field(body, "add_special", bool))
            parse_special = typed_field(body, "parse_special", bool) is not False
            ids = tokenizer.encode(body["content"], allow_special=parse_special, limit=self.model.ctx)
            if ids is None:
                raise RequestError(f"content: more than the {self.model.ctx} tokens of the context", "content",
                                   code="context_length_exceeded")
            if add_special and not ids[:1] == [tokenizer.bos_id]:
                ids.insert(0, tokenizer.bos_id)
            if not typed_field(body, "with_pieces", bool):
                return {"tokens": ids}
            pieces = []
            for t in ids:
                raw_piece = tokenizer.token_bytes(t)
                try:
                    piece = raw_piece.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(raw_piece)  # llama-server's form for bytes that are not UTF-8 on their own
                pieces.append({"id": t, "piece": piece})
            return {"tokens": pieces}

        return json_response(200, await self._in_worker(tokenize, await self._body(request)))

    async def _detokenize(self, request: Request) -> Response:
        def detokenize(raw: bytes) -> dict:
            body = parse_json(raw, self.max_depth)
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in tokens):
                raise RequestError("tokens: expected an array of token ids", "tokens")
            bad = [t for t in tokens if not 0 <= t < self.model.tokenizer.vocab_size]
            if bad:
                raise RequestError(f"tokens: {bad[0]} is not a token id (0..{self.model.tokenizer.vocab_size - 1})",
                                   "tokens")
            return {"content": self.model.tokenizer.decode(tokens)}

        return json_response(200, await self._in_worker(detokenize, await self._body(request)))


def _usage(done: ChatPiece) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}
