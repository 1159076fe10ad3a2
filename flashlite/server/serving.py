"""The serving machinery under ChatServer (app.py): the decode-cache slots answers take turns in, the Prometheus
metrics, the clocks and watches that bound how long a client may take, the responses that stream an answer's
frames (OpenAI's `data:` chunks, Anthropic's named events), and the uvicorn protocol guarded against slow or
oversized requests."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from flashlite.chat.completion import ChatPiece, shared_prefix
from flashlite.chat.sampling import StopChecker
from flashlite.server.requests import ClientGone, RequestError, internal_error

if TYPE_CHECKING:
    from flashlite.server.app import ChatServer

log = logging.getLogger("flashlite.server")

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class RawRouter:
    """chat's TokenRouter for plain text: stream-decoded ids and the stop rules, no chat markup parsed."""

    def __init__(self, tokenizer, stop=(), max_tokens: int | None = None):
        self._decoder = tokenizer.stream_decoder()
        self._checker = StopChecker(stop or (), max_tokens, (tokenizer.eos_id,))
        self.finish_reason: str | None = None

    def feed(self, token_id: int) -> list[ChatPiece]:
        text, reason = self._checker.feed(token_id, self._decoder.feed(token_id))
        if reason is not None:
            self.finish_reason = reason
            if reason == "length":
                text += self._decoder.flush()
        return [ChatPiece("content", text)] if text else []

    def finish(self, reason: str) -> list[ChatPiece]:
        self.finish_reason = reason
        text = self._checker.flush() + self._decoder.flush()
        return [ChatPiece("content", text)] if text else []


# ---- serving machinery ---------------------------------------------------------------------------------------------

class Slots:
    """The `parallel` decode caches, handed out on the event loop: a request takes the free one sharing the
    longest prefix with its prompt, or waits in line for the next one given back."""

    def __init__(self, caches: list):
        self.size = len(caches)
        self._free = list(caches)
        self._waiters: deque[asyncio.Future] = deque()
        self.active = 0
        self.closing = False

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def try_take(self, prompt: list[int]):
        if self.closing:
            raise RequestError("the server is shutting down", status=503, kind="server_error")
        if not self._free:
            return None
        cache = max(self._free, key=lambda c: shared_prefix(c, prompt))
        self._free.remove(cache)
        self.active += 1
        return cache

    async def take(self, prompt: list[int]):
        cache = self.try_take(prompt)
        if cache is not None:
            return cache
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            cache = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._hand_on(waiter.result())  # given a cache just as it stopped waiting
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise
        if cache is None:
            raise RequestError("the server is shutting down", status=503, kind="server_error")
        self.active += 1
        return cache

    def give_back(self, cache) -> None:
        self.active -= 1
        self._hand_on(cache)

    def _hand_on(self, cache) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(cache)
                return
        self._free.append(cache)

    def close(self) -> None:
        self.closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.prefill_tokens = self.prefill_seconds = 0.0  # answers whose first token's time is known
        self.decode_tokens = self.decode_seconds = 0.0
        self.busy_seconds = 0.0
        self.answers: dict[str, int] = {}
        self.refused_connections = 0

    def answered(self, usage: dict, finish: str, started: float, first: float | None, ended: float) -> None:
        with self._lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.cached_tokens += usage["cached_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            self.busy_seconds += ended - started
            self.answers[finish] = self.answers.get(finish, 0) + 1
            if first is not None:
                self.prefill_tokens += usage["prompt_tokens"] - usage["cached_tokens"]
                self.prefill_seconds += first - started
                self.decode_tokens += max(usage["completion_tokens"] - 1, 0)
                self.decode_seconds += ended - first

    def responded(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def render(self, server: ChatServer) -> str:
        stats = server.model.stats()
        slots = server.slots
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP flashlite_{name} {help_}")
            lines.append(f"# TYPE flashlite_{name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"flashlite_{name}{{{text}}} {value}" if text else f"flashlite_{name} {value}")

        with self._lock:
            metric("requests_total", "counter", "HTTP requests answered, by route and status.",
                   [({"route": r, "status": s}, n) for (r, s), n in sorted(self.requests.items())])
            metric("answers_total", "counter", "Generated answers, by finish reason.",
                   [({"finish_reason": f}, n) for f, n in sorted(self.answers.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished answers.", [({}, self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter", "Prompt tokens taken from a slot's kept cache.",
                   [({}, self.cached_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [({}, self.completion_tokens)])
            metric("prompt_tokens_per_second", "gauge", "Prefill throughput (prefilled tokens / prefill seconds).",
                   [({}, round(self.prefill_tokens / self.prefill_seconds, 3) if self.prefill_seconds else 0)])
            metric("generation_tokens_per_second", "gauge",
                   "Decode throughput of one answer (tokens after the first / seconds after the first).",
                   [({}, round(self.decode_tokens / self.decode_seconds, 3) if self.decode_seconds else 0)])
            metric("busy_seconds_total", "counter", "Seconds answers held a slot.", [({}, round(self.busy_seconds, 6))])
            metric("connections_refused_total", "counter", "Connections refused over --max-connections.",
                   [({}, self.refused_connections)])
        metric("requests_active", "gauge", "Answers generating now.", [({}, slots.active)])
        metric("requests_queued", "gauge", "Requests waiting for a slot.", [({}, slots.queued)])
        metric("slots", "gauge", "Answers that may generate at once (-np).", [({}, slots.size)])
        metric("connections", "gauge", "Open HTTP connections.", [({}, server.open_connections())])
        metric("tokens_forwarded_total", "counter", "Tokens through the model's forward pass.",
               [({}, stats["tokens"])])
        metric("expert_cache_hits_total", "counter", "Routed experts found in the expert cache (--ram-budget).",
               [({}, stats["expert_hits"])])
        metric("expert_cache_misses_total", "counter", "Routed experts read from disk (--ram-budget).",
               [({}, stats["expert_misses"])])
        metric("expert_bytes_read_total", "counter", "Bytes of experts read from disk.",
               [({}, stats["expert_bytes_read"])])
        metric("expert_io_stall_seconds_total", "counter", "Seconds forward passes waited for expert reads.",
               [({}, stats["io_stall_seconds"])])
        # speculative decoding (Model.stats()), the tokens by llama-server's names
        metric("spec_decode_num_draft_tokens_total", "counter", "Speculative decoding: tokens drafted.",
               [({}, stats["drafted_tokens"])])
        metric("spec_decode_num_accepted_tokens_total", "counter",
               "Speculative decoding: drafted tokens the model accepted.", [({}, stats["accepted_tokens"])])
        metric("spec_rounds_total", "counter",
               "Speculative decoding: verified batches (a round the drafter left without drafts included).",
               [({}, stats["spec_rounds"])])
        return "\n".join(lines) + "\n"


@dataclass
class Clock:
    """One answer's times (started: it has a slot; first: its first piece; ended: its done piece) and its done
    piece, for the log, /metrics and llama-server's `timings`."""

    started: float
    first: float | None = None
    ended: float | None = None
    done: ChatPiece | None = None

    def usage(self) -> dict:
        d = self.done
        return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                "total_tokens": d.prompt_tokens + d.completion_tokens, "cached_tokens": d.cached_tokens}

    def timings(self) -> dict:
        """llama-server's `timings` of a finished answer: the prompt's part until the first piece (the prefill
        and the first token), the prediction's after it (per_second: the tokens after the first over that time);
        draft_n and draft_n_accepted when speculative decoding drafted."""
        d = self.done
        first = self.ended if self.first is None else self.first
        prompt_n, prompt_ms = d.prompt_tokens - d.cached_tokens, (first - self.started) * 1e3
        predicted_n, predicted_ms = d.completion_tokens, (self.ended - first) * 1e3
        out = {"cache_n": d.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
               "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
               "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
               "predicted_n": predicted_n, "predicted_ms": predicted_ms,
               "predicted_per_token_ms": predicted_ms / (predicted_n - 1) if predicted_n > 1 else 0.0,
               "predicted_per_second": 1e3 * (predicted_n - 1) / predicted_ms if predicted_n > 1 and predicted_ms > 0
               else 0.0}
        if d.drafted_tokens:
            out["draft_n"], out["draft_n_accepted"] = d.drafted_tokens, d.accepted_tokens
        return out


class Watch:
    """Owns `receive` once the body is read: sets `cancel` (and `gone`) when the client disconnects."""

    def __init__(self, receive):
        self.cancel = threading.Event()
        self.gone = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(receive))

    async def _run(self, receive) -> None:
        with contextlib.suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
        self.gone.set()
        self.cancel.set()

    def stop(self) -> None:
        self._task.cancel()


class Out:
    """One request's response: the head once, then body parts; a send that stalls past `timeout` (a client that
    stopped reading) is a ClientGone."""

    def __init__(self, send, timeout: float, anthropic: bool):
        self._send, self._timeout, self.anthropic = send, timeout, anthropic
        self.started = False

    async def send(self, message: dict) -> None:
        # a timer that cancels this task, cheaper than asyncio.wait_for's task per send (one per token)
        task = asyncio.current_task()
        expired = []
        timer = asyncio.get_running_loop().call_later(self._timeout, lambda: expired.append(task.cancel()))
        try:
            await self._send(message)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel() if hasattr(task, "uncancel") else None
            raise ClientGone from None
        except OSError:
            raise ClientGone from None
        finally:
            timer.cancel()

    async def start(self, status: int, headers: list) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def part(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await self.start(status, headers + ([(b"connection", b"close")] if close else []))
        await self.part(data, more=False)

    async def error(self, exc: RequestError) -> None:
        await self.json(exc.status, exc.body(self.anthropic), exc.close)


def json_response(status: int, payload: dict, close: bool = False) -> Response:
    return Response(json.dumps(payload).encode(), status, {"connection": "close"} if close else None,
                    media_type="application/json")


class Silent(Response):
    """No answer: the client is gone."""

    def __init__(self):
        pass

    async def __call__(self, scope, receive, send) -> None:
        return None


class Job(Response):
    """A request that generates: waits for a slot, runs `work(cache, cancel)` in a generation thread and passes
    the items it yields to `respond(items, out, watch)`, all while watching for the client to leave."""

    def __init__(self, server: ChatServer, prompt: list[int], work, respond, anthropic: bool = False):
        self._server, self._prompt, self._work, self._respond = server, prompt, work, respond
        self._anthropic = anthropic

    async def __call__(self, scope, receive, send) -> None:
        server = self._server
        out = Out(send, server.timeout, self._anthropic)
        watch = Watch(receive)
        try:
            try:
                cache = await server._take_slot(self._prompt, watch)
            except RequestError as exc:
                await out.error(exc)
                return
            items = server._run_in_thread(cache, self._work, watch.cancel)
            try:
                await self._respond(items, out, watch)
            finally:
                await items.aclose()
        except ClientGone:
            watch.cancel.set()
        finally:
            watch.stop()


async def respond_json(items, out: Out, watch: Watch) -> None:
    """A whole answer: the work's one item, as JSON."""
    try:
        answer = None
        async for answer in items:
            pass
    except RequestError as exc:
        await out.error(exc)
        return
    except Exception:
        log.exception("generation failed")
        await out.error(internal_error())
        return
    if not watch.gone.is_set():
        await out.json(200, answer)


def respond_events(frame, tail: bytes | None, error_frame):
    """A stream: each item framed as a server-sent event, then `tail`; an error before the first item is a plain
    error response, after it the stream's last event."""

    async def respond(items, out: Out, watch: Watch) -> None:
        try:
            async for item in items:
                if watch.gone.is_set():
                    continue  # nobody to send to: the generation was cancelled and drains
                if not out.started:
                    await out.start(200, SSE_HEADERS)
                await out.part(frame(item))
        except ClientGone:
            raise
        except Exception as exc:
            if not isinstance(exc, RequestError):
                log.exception("generation failed")
                exc = internal_error()
            if not out.started:
                await out.error(exc)
            elif not watch.gone.is_set():
                await out.part(error_frame(exc), more=False)
            return
        if watch.gone.is_set():
            raise ClientGone
        await out.part(tail or b"", more=False)

    return respond


def openai_frame(item: dict) -> bytes:
    return b"data: " + json.dumps(item).encode() + b"\n\n"


def openai_error_frame(exc: RequestError) -> bytes:
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"


def anthropic_frame(item: tuple) -> bytes:
    name, data = item
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def anthropic_error_frame(exc: RequestError) -> bytes:
    return anthropic_frame(("error", exc.body(anthropic=True)))


def error_response(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, {400: b"Bad Request", 503: b"Service Unavailable"}[status], len(body), body))


def guarded_protocol(server: ChatServer) -> type:
    """uvicorn's h11 protocol with a cap on open connections (more are answered 503 and closed) and a limit on the
    time a connection may take to send a request's head (slowloris): `idle_timeout` from its first byte, or from
    connecting, while no request is in progress."""
    cap, idle = server.max_connections, server.idle_timeout

    class Guarded(H11Protocol):
        _head_timer = None
        _head_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # a head and its body go out as two writes: without this, the body waits for the client's
                # delayed ACK of the head (40 ms a response on Linux); asyncio sets it only for sockets it made
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.connections) > cap:
                server.metrics.refused_connections += 1
                body = json.dumps(RequestError(f"the server has {cap} connections open, its limit", status=503,
                                               kind="server_error").body()).encode()
                transport.write(error_response(503, body))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def _arm(self) -> None:
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(idle, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is self._head_cycle:
                if self.cycle is None or self.cycle.response_complete:  # no request head arrived in time
                    self.transport.close()
            elif self.cycle.response_complete:
                self._arm()  # requests came and went: time the next one

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # a malformed request or a head too large
            body = json.dumps(RequestError(f"invalid HTTP request: {msg}").body()).encode()
            self.transport.write(error_response(400, body))
            self.transport.close()

    return Guarded


class Uvicorn(uvicorn.Server):
    """uvicorn's server, which cancels the answers in flight when it starts shutting down and takes signals only
    when asked to."""

    def __init__(self, config, owner: ChatServer):
        super().__init__(config)
        self.owner = owner
        self.take_signals = False

    @contextlib.contextmanager
    def capture_signals(self):
        if not self.take_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self._signalled) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _signalled(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self.owner.stopped_by_signal = sig

    async def shutdown(self, sockets=None) -> None:
        self.owner._begin_close()
        await super().shutdown(sockets=sockets)
