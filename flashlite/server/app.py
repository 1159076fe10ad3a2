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
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from flashlite.chat.completion import ChatPiece, _chunks, _completion, _decode, check_messages, shared_prefix, show
from flashlite.chat.sampling import Sampler, StopChecker
from flashlite.chat.template import BOS, encode_messages
from flashlite.server import anthropic_api
from flashlite.server.anthropic_api import AnthropicError
from flashlite.speculative import SpecOptions, check_n_max, parse_spec_type

log = logging.getLogger("flashlite.server")

MAX_BODY = 32 << 20  # bytes, whatever the context: a prompt filling a 1M-token context is about 4 MB of text
MAX_DEPTH = 64  # JSON nesting a request may have (chat messages need 5, tool schemas a few more)
JSON_ESCAPE = 6  # bytes of JSON one byte of text may take (`\u00XX`)
BODY_SLACK = 1 << 16  # bytes of a body besides its prompt text (field names, sampling options)
MIN_BODY_RATE = 16 << 10  # bytes / s a body must average, after idle_timeout to start
THINK_MODES = ("none", "high", "max")
# V4 has one reasoning level below "max"; OpenAI's graded efforts all land on it
REASONING_EFFORTS = {"none": "none", "minimal": "high", "low": "high", "medium": "high", "high": "high",
                     "xhigh": "max", "max": "max"}
SAMPLING_NUMBERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}


class RequestError(Exception):
    """A request the server answers with an error in OpenAI's (or, on /v1/messages, Anthropic's) shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind
        self.close = close  # the connection cannot carry another request (an unread body)

    def body(self, anthropic: bool = False) -> dict:
        if anthropic:
            kind = ANTHROPIC_KINDS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection (or stopped reading); there is nobody left to answer."""


def internal_error() -> RequestError:
    return RequestError("internal server error", status=500, kind="server_error")


# ---- request checks ----------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    messages: list[dict]
    stream: bool
    options: dict  # keyword arguments of Model.create_chat_completion
    speculation: dict  # the request's speculative.* fields (see _speculation)


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
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise RequestError("logprobs: not supported", "logprobs")
    if body.get("logit_bias"):
        raise RequestError("logit_bias: not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"response_format: only {{\"type\": \"text\"}} is supported, got {show(fmt)}",
                           "response_format")


def _sampling(body: dict) -> dict:
    """The sampling options, max_tokens and stop of an OpenAI body (chat or completions)."""
    options = {}
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
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError("stream_options: expected an object", "stream_options")
    return options


def parse_chat_request(body) -> ChatRequest:
    """Check a /v1/chat/completions body; a bad field is a RequestError naming it. Ranges of the sampling numbers
    are left to flashlite.chat.sampling, whose errors also name the field."""
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {show(body)}")
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as exc:
        raise _value_error(exc) from None
    _unsupported(body)
    _typed(body, "model", str)
    options = {"think": _think(body), "tools": _tools(body), **_sampling(body)}
    stream = bool(_typed(body, "stream", bool))
    return ChatRequest(messages, stream, options, _speculation(body))


def _speculation(body: dict) -> dict:
    """The request's speculative decoding, by the names of llama-server's request schema: `speculative.type` (a
    --spec-type name; "none" turns the server's default off) and `speculative.n_max` (most drafts per verified
    batch). Absent fields keep the server's defaults (its --spec-type, --spec-draft-n-max)."""
    out = {}
    kind = _typed(body, "speculative.type", str)
    if kind is not None:
        try:
            out["type"] = parse_spec_type(kind)
        except ValueError as exc:
            raise RequestError(str(exc).replace("spec_type", "speculative.type", 1), "speculative.type") from None
    n_max = _typed(body, "speculative.n_max", int)
    if n_max is not None:
        try:
            out["n_max"] = check_n_max(n_max)
        except ValueError as exc:
            raise RequestError(str(exc).replace("spec_draft_n_max", "speculative.n_max", 1),
                               "speculative.n_max") from None
    return out


def _value_error(exc: ValueError) -> RequestError:
    """A ValueError of the chat API as a 400; its messages start with the argument they are about."""
    head = str(exc).split(":", 1)[0]
    name = head.split("[", 1)[0]
    known = name in ("messages", "tools", "tool_calls", "stop", "max_tokens", "think", "prompt", "tokens",
                     "content", *SAMPLING_NUMBERS)
    too_long = name in ("messages", "prompt") and "context" in str(exc)
    return RequestError(str(exc), head if known else None, code="context_length_exceeded" if too_long else None)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(raw: bytes, stop_above: int = MAX_DEPTH) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not counted), without
    parsing it; counting stops once it passes stop_above."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for start in range(0, len(brackets), 1 << 20):
        part = np.frombuffer(brackets, np.uint8, min(1 << 20, len(brackets) - start), start)
        # '[' 0x5b and '{' 0x7b have bit 1 set, ']' 0x5d and '}' 0x7d do not
        levels = np.cumsum(((part >> 1) & 1).astype(np.int32) * 2 - 1) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > stop_above:
            break
    return deepest


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH):
    """A request body as JSON: nesting deeper than max_depth is refused before parsing, NaN / Infinity refused."""
    if json_depth(raw, max_depth) > max_depth:
        raise RequestError(f"body: JSON nested more than {max_depth} deep")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(f"body: JSON nested more than {max_depth} deep") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, NaN / Infinity
        raise RequestError(f"the body is not valid JSON: {exc}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_completion_request(body, tokenizer) -> tuple[list[int] | str, bool, dict]:
    """(prompt text or token ids, stream, options) of a /v1/completions body (options["speculation"]: as for
    chat)."""
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {show(body)}")
    _unsupported(body)
    _typed(body, "model", str)
    for name in ("echo",):
        if _typed(body, name, bool):
            raise RequestError(f"{name}: not supported", name)
    if _typed(body, "best_of", int) not in (None, 1):
        raise RequestError("best_of: only 1 is supported", "best_of")
    if body.get("suffix"):
        raise RequestError("suffix: not supported (no fill-in-the-middle)", "suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt: expected a string, or an array of token ids (one prompt per request)",
                               "prompt")
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(f"prompt: {bad[0]} is not a token id (0..{tokenizer.vocab_size - 1})", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError(f"prompt: expected a non-empty string or an array of token ids, got {show(prompt)}",
                           "prompt")
    options = _sampling(body)
    options["max_tokens"] = options["max_tokens"] or COMPLETION_MAX_TOKENS
    options["speculation"] = _speculation(body)
    return prompt, bool(_typed(body, "stream", bool)), options


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
class _Clock:
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


class _Watch:
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


class _Out:
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


def _json_response(status: int, payload: dict, close: bool = False) -> Response:
    return Response(json.dumps(payload).encode(), status, {"connection": "close"} if close else None,
                    media_type="application/json")


class _Silent(Response):
    """No answer: the client is gone."""

    def __init__(self):
        pass

    async def __call__(self, scope, receive, send) -> None:
        return None


class _Job(Response):
    """A request that generates: waits for a slot, runs `work(cache, cancel)` in a generation thread and passes
    the items it yields to `respond(items, out, watch)`, all while watching for the client to leave."""

    def __init__(self, server: ChatServer, prompt: list[int], work, respond, anthropic: bool = False):
        self._server, self._prompt, self._work, self._respond = server, prompt, work, respond
        self._anthropic = anthropic

    async def __call__(self, scope, receive, send) -> None:
        server = self._server
        out = _Out(send, server.timeout, self._anthropic)
        watch = _Watch(receive)
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


async def _respond_json(items, out: _Out, watch: _Watch) -> None:
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


def _respond_events(frame, tail: bytes | None, error_frame):
    """A stream: each item framed as a server-sent event, then `tail`; an error before the first item is a plain
    error response, after it the stream's last event."""

    async def respond(items, out: _Out, watch: _Watch) -> None:
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


def _openai_frame(item: dict) -> bytes:
    return b"data: " + json.dumps(item).encode() + b"\n\n"


def _openai_error_frame(exc: RequestError) -> bytes:
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"


def _anthropic_frame(item: tuple) -> bytes:
    name, data = item
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def _anthropic_error_frame(exc: RequestError) -> bytes:
    return _anthropic_frame(("error", exc.body(anthropic=True)))


def _error_response(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, {400: b"Bad Request", 503: b"Service Unavailable"}[status], len(body), body))


def _guarded_protocol(server: ChatServer) -> type:
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
                transport.write(_error_response(503, body))
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
            self.transport.write(_error_response(400, body))
            self.transport.close()

    return Guarded


class _Uvicorn(uvicorn.Server):
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
        config = uvicorn.Config(self._app(), http=_guarded_protocol(self), ws="none", lifespan="off",
                                log_config=None, access_log=False, loop="asyncio", server_header=False,
                                headers=[("server", "flashlite")], timeout_keep_alive=max(1, int(idle_timeout)),
                                timeout_graceful_shutdown=10)
        self._uvicorn = _Uvicorn(config, self)
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

    async def _take_slot(self, prompt: list[int], watch: _Watch):
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
            raise _value_error(exc) from None
        return self._bounded(text, "messages")

    def _bounded(self, text: str, name: str) -> list[int]:
        ids = self.model.tokenizer.encode(text, limit=self.model.ctx - 1)
        if ids is None:
            raise RequestError(f"{name}: the prompt is more than {self.model.ctx - 1} tokens, the context holds "
                               f"{self.model.ctx}", name, code="context_length_exceeded")
        return ids

    def _answered(self, request: Request, answer_id: str, clock: _Clock) -> None:
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
                    return _Silent()
                except AnthropicError as exc:
                    return _json_response(400, RequestError(str(exc), exc.param).body(anthropic))
                except RequestError as exc:
                    log.log(logging.ERROR if exc.status >= 500 else logging.INFO, "%s %s -> %d: %s",
                            request.method, request.url.path, exc.status, exc.message)
                    return _json_response(exc.status, exc.body(anthropic), exc.close)
                except Exception:
                    log.exception("%s %s failed", request.method, request.url.path)
                    return _json_response(500, internal_error().body(anthropic))
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
            return _json_response(error.status, error.body(path.startswith("/v1/messages")))

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
        return _json_response(200, {"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(self), media_type="text/plain; version=0.0.4")

    def _card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashlite",
                "meta": {"n_ctx": self.model.ctx, "n_vocab": self.model.vocab_size}}

    async def _models(self, request: Request) -> Response:
        return _json_response(200, {"object": "list", "data": [self._card()]})

    async def _model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_id:
            raise RequestError(f"model {model_id!r} is not loaded (this server has {self.model_id!r})",
                               "model", status=404, code="model_not_found")
        return _json_response(200, self._card())

    async def _chat(self, request: Request) -> Response:
        def prepare(raw: bytes):
            chat = parse_chat_request(parse_json(raw, self.max_depth))
            spec = self._spec(chat.speculation)
            return chat, spec, self._prompt_ids(chat.messages, chat.options["think"], chat.options["tools"])

        chat, spec, prompt = await self._in_worker(prepare, await self._body(request))
        model = self.model
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}

        def work(cache, cancel):
            clock = _Clock(time.perf_counter())
            try:
                pieces = model.chat(chat.messages, stream=True, cancel=cancel, cache=cache, spec_type=spec,
                                    **chat.options)
            except ValueError as exc:
                raise _value_error(exc) from None
            pieces = self._pieces(request, pieces, clock, head["id"])
            if chat.stream:
                for chunk in _chunks(pieces, head):
                    if "usage" in chunk:  # the last: the answer is done
                        chunk["timings"] = clock.timings()
                    yield chunk
            else:
                yield {**_completion(pieces, head), "timings": clock.timings()}

        if chat.stream:
            return _Job(self, prompt, work, _respond_events(_openai_frame, b"data: [DONE]\n\n", _openai_error_frame))
        return _Job(self, prompt, work, _respond_json)

    def _pieces(self, request: Request, pieces, clock: _Clock, answer_id: str):
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
                raise _value_error(exc) from None
            return ids, stream, sampler, router, self._spec(options["speculation"])

        ids, stream, sampler, router, spec = await self._in_worker(prepare, await self._body(request))
        model = self.model
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id}

        def work(cache, cancel):
            clock = _Clock(time.perf_counter())
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
            return _Job(self, ids, work, _respond_events(_openai_frame, b"data: [DONE]\n\n", _openai_error_frame))
        return _Job(self, ids, work, _respond_json)

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
            clock = _Clock(time.perf_counter())
            try:
                pieces = model.chat(spec.messages, think=spec.think, stream=True, cancel=cancel, tools=spec.tools,
                                    max_tokens=spec.max_tokens, stop=spec.stop or None, cache=cache, **spec.sampling)
            except ValueError as exc:
                raise _value_error(exc) from None
            pieces = self._pieces(request, pieces, clock, answer_id)
            if spec.stream:
                yield from anthropic_api.message_events(pieces, spec, model_id, decode, len(prompt))
            else:
                yield anthropic_api.message(pieces, spec, model_id, decode)

        if spec.stream:
            return _Job(self, prompt, work, _respond_events(_anthropic_frame, None, _anthropic_error_frame),
                        anthropic=True)
        return _Job(self, prompt, work, _respond_json, anthropic=True)

    async def _count_tokens(self, request: Request) -> Response:
        def count(raw: bytes) -> int:
            return len(self._parse_messages(raw, True)[1])  # refused past the context, as /v1/messages would be

        return _json_response(200, {"input_tokens": await self._in_worker(count, await self._body(request))})

    async def _tokenize(self, request: Request) -> Response:
        tokenizer = self.model.tokenizer

        def tokenize(raw: bytes) -> dict:
            body = parse_json(raw, self.max_depth)
            if not isinstance(body, dict) or not isinstance(body.get("content"), str):
                raise RequestError("content: expected a string", "content")
            add_special = bool(_typed(body, "add_special", bool))
            parse_special = _typed(body, "parse_special", bool) is not False
            ids = tokenizer.encode(body["content"], allow_special=parse_special, limit=self.model.ctx)
            if ids is None:
                raise RequestError(f"content: more than the {self.model.ctx} tokens of the context", "content",
                                   code="context_length_exceeded")
            if add_special and not ids[:1] == [tokenizer.bos_id]:
                ids.insert(0, tokenizer.bos_id)
            if not _typed(body, "with_pieces", bool):
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

        return _json_response(200, await self._in_worker(tokenize, await self._body(request)))

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

        return _json_response(200, await self._in_worker(detokenize, await self._body(request)))


def _usage(done: ChatPiece) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}
