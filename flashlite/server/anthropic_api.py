"""Anthropic's Messages API over the chat pieces: requests in, `message` objects or SSE events out.

`parse_messages_request` checks a `/v1/messages` (or `/count_tokens`) body and turns it into the OpenAI-style
messages, tools and V4 reasoning mode that chat() takes; `message` builds the answer from the pieces and
`message_events` streams it as Anthropic's events (message_start, content_block_start / _delta / _stop,
message_delta, message_stop). Reasoning comes back as `thinking` blocks, tool calls as `tool_use` blocks.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from flashlite.chat.completion import show
from flashlite.server.requests import typed_field

# Anthropic's `thinking` switches reasoning on; V4 has two reasoning modes, output_config.effort picks the higher
EFFORTS = {"low": "high", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}
SAMPLING = {"temperature": float, "top_p": float, "top_k": int}


class AnthropicError(ValueError):
    """A bad field of a Messages request; the message starts with the field's path."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class MessagesRequest:
    messages: list[dict]  # OpenAI-style, for encode_messages / chat
    tools: list[dict] | None
    think: str
    stream: bool = False
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    show_thinking: bool = True


def _typed(body: dict, name: str, kind: type, where: str | None = None):
    return typed_field(body, name, kind, where, AnthropicError)


def _text_of(blocks, where: str) -> str:
    """A string, or text blocks joined (a system prompt, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise AnthropicError(f"{where}: expected a string or an array of text blocks, got {show(blocks)}", where)
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            got = block.get("type") if isinstance(block, dict) else block
            raise AnthropicError(f"{where}[{j}]: only text blocks are supported here, got {show(got)}",
                                 f"{where}[{j}]")
        texts.append(block["text"])
    return "\n".join(texts)


def _user(blocks, where: str) -> list[dict]:
    """A user turn's blocks as OpenAI messages: each tool_result a `tool` message, the text one `user` message."""
    if isinstance(blocks, str):
        return [{"role": "user", "content": blocks}]
    if not isinstance(blocks, list) or not blocks:
        raise AnthropicError(f"{where}: expected a string or a non-empty array of content blocks", where)
    out, texts = [], []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise AnthropicError(f"{at}.tool_use_id: expected a string", f"{at}.tool_use_id")
            content = _text_of(block.get("content") or "", f"{at}.content")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
        elif kind in ("image", "document", "search_result"):
            raise AnthropicError(f"{at}: {kind} blocks are not supported (text only)", at)
        else:
            raise AnthropicError(f"{at}: expected a text or tool_result block, got {show(kind or block)}", at)
    if texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(blocks, where: str) -> dict:
    if isinstance(blocks, str):
        return {"role": "assistant", "content": blocks}
    if not isinstance(blocks, list):
        raise AnthropicError(f"{where}: expected a string or an array of content blocks", where)
    texts, thinking, calls = [], [], []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise AnthropicError(f"{at}: a tool_use block needs a name and an input object", at)
            calls.append({"id": block.get("id") or "", "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        else:
            raise AnthropicError(f"{at}: expected a text, thinking or tool_use block, got {show(kind or block)}", at)
    return {"role": "assistant", "content": "".join(texts), "reasoning_content": "".join(thinking) or None,
            "tool_calls": calls or None}


def _messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise AnthropicError("messages: expected a non-empty array of messages", "messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise AnthropicError(f"{where}: expected an object, got {show(msg)}", where)
        role = msg.get("role")
        if role == "user":
            out += _user(msg.get("content"), f"{where}.content")
        elif role == "assistant":
            out.append(_assistant(msg.get("content"), f"{where}.content"))
        else:
            raise AnthropicError(f"{where}.role: expected user or assistant, got {show(role)}", f"{where}.role")
    if value[-1].get("role") != "user":
        raise AnthropicError("messages: the last message must be a user turn (prefilling the assistant's answer "
                             "is not supported)", "messages")
    return out


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise AnthropicError("tools: expected an array of tools", "tools")
    out = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            got = tool.get("type") if isinstance(tool, dict) else tool
            raise AnthropicError(f"{where}: only custom tools ({{\"name\", \"input_schema\"}}) are supported, got "
                                 f"{show(got)}", where)
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise AnthropicError(f"{where}: a tool needs a name and an input_schema object", where)
        function = {"name": tool["name"], "description": tool.get("description") or "",
                    "parameters": tool["input_schema"]}
        out.append({"type": "function", "function": function})
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if kind not in (None, "auto", "none"):
        raise AnthropicError(f"tool_choice: only auto and none are supported, got {show(kind)}", "tool_choice")
    return None if kind == "none" else out or None


def _think(body: dict) -> tuple[str, bool]:
    """(V4 reasoning mode, whether thinking text is shown) for `thinking` and `output_config.effort`."""
    thinking = body.get("thinking")
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise AnthropicError("output_config: expected an object", "output_config")
    config = config or {}
    if config.get("format") is not None:
        raise AnthropicError("output_config.format: structured outputs are not supported", "output_config.format")
    effort = _typed(config, "effort", str, "output_config.effort")
    if effort is not None and effort not in EFFORTS:
        raise AnthropicError(f"output_config.effort: expected one of {', '.join(EFFORTS)}, got {show(effort)}",
                             "output_config.effort")
    if thinking is None:
        return "none", True
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return "none", True
    if kind not in ("enabled", "adaptive"):
        raise AnthropicError(f"thinking.type: expected enabled, adaptive or disabled, got {show(kind or thinking)}",
                             "thinking.type")
    if kind == "enabled":
        budget = _typed(thinking, "budget_tokens", int, "thinking.budget_tokens")
        if budget is None or budget < 1:  # required, but V4 has no budget: max_tokens bounds reasoning + answer
            raise AnthropicError(f"thinking.budget_tokens: expected an integer >= 1, got {show(budget)}",
                                 "thinking.budget_tokens")
    display = thinking.get("display")
    if display not in (None, "summarized", "omitted"):
        raise AnthropicError(f"thinking.display: expected summarized or omitted, got {show(display)}",
                             "thinking.display")
    return EFFORTS.get(effort or "high"), display != "omitted"


def parse_messages_request(body, counting: bool = False) -> MessagesRequest:
    """Check a Messages body (`counting`: a count_tokens body, without max_tokens and sampling)."""
    if not isinstance(body, dict):
        raise AnthropicError(f"body: expected a JSON object, got {show(body)}")
    _typed(body, "model", str)
    max_tokens = None
    if not counting:
        max_tokens = _typed(body, "max_tokens", int)
        if max_tokens is None or max_tokens < 1:
            raise AnthropicError(f"max_tokens: expected an integer >= 1, got {show(body.get('max_tokens'))}",
                                 "max_tokens")
    if body.get("mcp_servers"):
        raise AnthropicError("mcp_servers: not supported", "mcp_servers")
    think, show_thinking = _think(body)
    request = MessagesRequest(_messages(body), _tools(body), think, max_tokens=max_tokens,
                              show_thinking=show_thinking)
    if counting:
        return request
    request.stream = bool(_typed(body, "stream", bool))
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise AnthropicError(f"stop_sequences: expected an array of non-empty strings, got {show(stop)}",
                             "stop_sequences")
    request.stop = list(stop or [])
    for name, kind in SAMPLING.items():
        if (value := _typed(body, name, kind)) is not None:
            request.sampling[name] = value
    return request


def _stop_reason(done, request: MessagesRequest, decode) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished answer."""
    reason = done.finish_reason
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        if request.max_tokens is None or done.completion_tokens < request.max_tokens:
            return "model_context_window_exceeded", None
        return "max_tokens", None
    if reason == "stop" and request.stop:
        text = decode(done.token_ids)
        hits = [(text.find(s), i) for i, s in enumerate(request.stop) if s in text]
        if hits:
            return "stop_sequence", request.stop[min(hits)[1]]
    return "end_turn", None  # "stop" at EOS, or "cancelled" (the client left or the server closed)


def usage(done) -> dict:
    """Anthropic's usage: input_tokens are those not read from a cache."""
    return {"input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
            "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_use(call: dict) -> dict:
    raw = call["function"]["arguments"]
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        arguments = {"arguments": raw}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call["function"]["name"],
            "input": arguments if isinstance(arguments, dict) else {"arguments": arguments}}


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def message(pieces, request: MessagesRequest, model_id: str, decode) -> dict:
    """The `message` object of a whole answer."""
    content: list[dict] = []
    done = None
    for piece in pieces:
        if piece.kind == "done":
            done = piece
        elif piece.kind == "tool_call":
            content.append(_tool_use(piece.tool_call))
        elif piece.kind == "reasoning":
            if content and content[-1]["type"] == "thinking":
                content[-1]["thinking"] += piece.text if request.show_thinking else ""
            else:
                content.append({"type": "thinking", "thinking": piece.text if request.show_thinking else "",
                                "signature": ""})
        elif piece.text:
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += piece.text
            else:
                content.append({"type": "text", "text": piece.text})
    reason, sequence = _stop_reason(done, request, decode)
    return {"id": new_id(), "type": "message", "role": "assistant", "model": model_id, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(done)}


def message_events(pieces, request: MessagesRequest, model_id: str, decode, prompt_tokens: int) -> Iterator[tuple]:
    """(event name, data) pairs of a streamed answer, in Anthropic's order."""
    head = {"id": new_id(), "type": "message", "role": "assistant", "model": model_id, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
    yield "message_start", {"type": "message_start", "message": head}
    index, open_kind = -1, None

    def close():
        return "content_block_stop", {"type": "content_block_stop", "index": index}

    for piece in pieces:
        if piece.kind == "done":
            if open_kind is not None:
                if open_kind == "thinking":
                    yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "signature_delta", "signature": ""}}
                yield close()
            reason, sequence = _stop_reason(piece, request, decode)
            yield "message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                    "usage": usage(piece)}
            yield "message_stop", {"type": "message_stop"}
            return
        kind = {"reasoning": "thinking", "content": "text", "tool_call": "tool_use"}[piece.kind]
        if kind != "tool_use" and not piece.text:
            continue
        if kind != open_kind or kind == "tool_use":
            if open_kind is not None:
                if open_kind == "thinking":
                    yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "signature_delta", "signature": ""}}
                yield close()
            index += 1
            open_kind = kind
            if kind == "tool_use":
                block = _tool_use(piece.tool_call)
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {**block, "input": {}}}
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": json.dumps(block["input"])}}
                continue
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}
        if kind == "thinking":
            if request.show_thinking:
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "thinking_delta", "thinking": piece.text}}
        else:
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta", "text": piece.text}}
