"""What a request to the server may say: the OpenAI and Anthropic request bodies checked and turned into the
generation's options, and the errors the server answers with (RequestError, in either API's shape). Everything
here runs before any of a request's cost is spent: a bad field is named in the answer, never a crash."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from flashlite.chat.completion import check_messages, show
from flashlite.speculative import check_n_max, parse_spec_type

MAX_DEPTH = 64  # JSON nesting a request may have (chat messages need 5, tool schemas a few more)
THINK_MODES = ("none", "high", "max")
# V4 has one reasoning level below "max"; OpenAI's graded efforts all land on it
REASONING_EFFORTS = {"none": "none", "minimal": "high", "low": "high", "medium": "high", "high": "high",
                     "xhigh": "max", "max": "max"}
SAMPLING_NUMBERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
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


def typed_field(body: dict, name: str, kind: type, where: str | None = None, error: type = RequestError):
    """body[name] as `kind` (None when absent or null); an integral float passes as an int, a bool as nothing else.
    Else `error` (RequestError, or the Anthropic API's AnthropicError) naming the field as `where` (default: name)."""
    value = body.get(name)
    where = where or name
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
    raise error(f"{where}: expected {what}, got {show(value)}", where)


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
    effort = typed_field(body, "reasoning_effort", str)
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
    n = typed_field(body, "n", int)
    if n not in (None, 1):
        raise RequestError(f"n: only 1 choice per request is supported, got {n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if typed_field(body, name, float) not in (None, 0.0):
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
        if (value := typed_field(body, name, kind)) is not None:
            options[name] = value
    if (value := typed_field(body, "repeat_penalty", float)) is not None:  # llama.cpp's name
        options["repetition_penalty"] = value
    seed = typed_field(body, "seed", int)
    if seed is not None and seed < -1:
        raise RequestError(f"seed: expected an integer >= 0 (or -1 for a random one), got {seed}", "seed")
    options["seed"] = None if seed == -1 else seed
    limits = {name: typed_field(body, name, int) for name in ("max_completion_tokens", "max_tokens")}
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
        raise value_error(exc) from None
    _unsupported(body)
    typed_field(body, "model", str)
    options = {"think": _think(body), "tools": _tools(body), **_sampling(body)}
    stream = bool(typed_field(body, "stream", bool))
    return ChatRequest(messages, stream, options, _speculation(body))


def _speculation(body: dict) -> dict:
    """The request's speculative decoding, by the names of llama-server's request schema: `speculative.type` (a
    --spec-type name; "none" turns the server's default off) and `speculative.n_max` (most drafts per verified
    batch). Absent fields keep the server's defaults (its --spec-type, --spec-draft-n-max)."""
    out = {}
    kind = typed_field(body, "speculative.type", str)
    if kind is not None:
        try:
            out["type"] = parse_spec_type(kind)
        except ValueError as exc:
            raise RequestError(str(exc).replace("spec_type", "speculative.type", 1), "speculative.type") from None
    n_max = typed_field(body, "speculative.n_max", int)
    if n_max is not None:
        try:
            out["n_max"] = check_n_max(n_max)
        except ValueError as exc:
            raise RequestError(str(exc).replace("spec_draft_n_max", "speculative.n_max", 1),
                               "speculative.n_max") from None
    return out


def value_error(exc: ValueError) -> RequestError:
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
    typed_field(body, "model", str)
    for name in ("echo",):
        if typed_field(body, name, bool):
            raise RequestError(f"{name}: not supported", name)
    if typed_field(body, "best_of", int) not in (None, 1):
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
    return prompt, bool(typed_field(body, "stream", bool)), options
