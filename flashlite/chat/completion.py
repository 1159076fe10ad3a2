"""Chat for apps: messages in, reasoning / content / tool-call pieces out, or OpenAI-shaped completion dicts.

Every call decodes in a cache of its own, so conversations interleave on one loaded model; their forward passes
take turns through a per-model lock. A `cancel` threading.Event set from another thread ends generation between
two tokens with finish_reason "cancelled".
"""
from __future__ import annotations

import json

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from flashlite.chat.sampling import Sampler, StopChecker
from flashlite.chat.template import OutputParser, encode_messages
from flashlite.chat.tokenizer import Tokenizer


@dataclass
class ChatPiece:
    """One streamed item: "reasoning" / "content" text, a parsed "tool_call", or the final "done" piece that
    carries finish_reason ("stop", "length", "tool_calls", "cancelled"), the token counts and the generated ids."""

    kind: str
    text: str = ""
    tool_call: dict | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, taken from a kept cache instead of prefilled
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for this answer
    accepted_tokens: int = 0  # of them, accepted (llama-server's timings.draft_n / draft_n_accepted)


class TokenRouter:
    """Turns generated token ids into pieces: stream-decodes them, applies the stop rules, parses the markup."""

    def __init__(self, tokenizer: Tokenizer, think: str = "none", stop=(), max_tokens: int | None = None):
        self._decoder = tokenizer.stream_decoder()
        self._checker = StopChecker(stop or (), max_tokens, (tokenizer.eos_id,))
        self._parser = OutputParser(think)
        self.finish_reason: str | None = None

    def feed(self, token_id: int) -> list[ChatPiece]:
        """Pieces that token_id completes; sets finish_reason when it ends generation."""
        text, reason = self._checker.feed(token_id, self._decoder.feed(token_id))
        if reason is None:
            return self._pieces(self._parser.feed(text))
        # a stop (EOS or stop string) drops what follows it; a length cut keeps any half-decoded character
        tail = self._decoder.flush() if reason == "length" else ""
        return self._close(reason, text + tail)

    def finish(self, reason: str) -> list[ChatPiece]:
        """End generation for a reason of the caller's (cancel, context full); flushes the held text."""
        return self._close(reason, self._checker.flush() + self._decoder.flush())

    def _close(self, reason: str, text: str) -> list[ChatPiece]:
        pieces = self._pieces(self._parser.feed(text) + self._parser.finish())
        self.finish_reason = "tool_calls" if reason == "stop" and self._parser.tool_calls else reason
        return pieces

    @staticmethod
    def _pieces(events) -> list[ChatPiece]:
        return [ChatPiece(e.kind, e.text, e.tool_call) for e in events]

# the roles a message may have (V4's chat format adds developer; tool results fold into the user turn)
ROLES = ("system", "developer", "user", "assistant", "tool")


def show(value) -> str:
    """A value as JSON, cut to 40 characters, for error messages."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def check_messages(value) -> list[dict]:
    """OpenAI-style messages, checked (a non-empty list of objects with a known role, string content or an array
    of text parts, well-formed tool calls) and with text parts joined; ValueError naming the message and field."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages: expected a non-empty array of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: expected an object, got {show(msg)}")
        if msg.get("role") not in ROLES:
            raise ValueError(f"{where}.role: expected one of {', '.join(ROLES)}, got {show(msg.get('role'))}")
        content = msg.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}.content")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"{where}.content: expected a string or an array of text parts, got {show(content)}")
        if msg.get("tool_calls") is not None:
            _check_tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        out.append({**msg, "content": content})
    return out


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            got = part.get("type") if isinstance(part, dict) else part
            raise ValueError(f"{where}[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported, "
                             f"got {show(got)}")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_tool_calls(calls, where: str) -> None:
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), (str, dict)) for c in calls):
        raise ValueError(f"{where}: expected an array of {{\"type\": \"function\", \"function\": {{\"name\", "
                         f"\"arguments\"}}}} calls")



def chat(model, messages: list[dict], think: str = "none", stream: bool = True, cancel: threading.Event | None = None,
         tools: list[dict] | None = None, max_tokens: int | None = None, stop=None, temperature: float = 1.0,
         top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
         seed: int | None = None, cache=None, spec_type: str | None = None, spec_draft_n_max: int | None = None,
         model_draft=None) -> Iterator[ChatPiece] | list[ChatPiece]:
    """Answer `messages` (OpenAI-style) with DeepSeek V4's chat format.

    stream=True: an iterator of pieces as they decode, the "done" piece last. stream=False: the same pieces with
    consecutive text of one kind merged. `max_tokens` None runs until EOS, a stop string or the context's end.
    `cache` (from model.new_cache()), kept by the caller from one turn to the next, lets a turn reuse the longest
    prefix of its prompt already in the cache and prefill only the rest; without it every call prefills it all.
    spec_type 'ngram' / 'mtp' (with model_draft, an MTP draft GGUF), spec_draft_n_max: speculative decoding, with
    the same tokens as without at temperature 0 and the same distribution otherwise (flashlite.speculative);
    None: the model's default (load(spec_type=...))."""
    ids = prompt_ids(model, messages, think, tools)
    if len(ids) >= model.ctx:
        raise ValueError(f"messages: the prompt is {len(ids)} tokens, the context holds {model.ctx}")
    sampler = Sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed)
    spec = model.spec_options(spec_type, spec_draft_n_max, model_draft)
    router = TokenRouter(model.tokenizer, think, stop, max_tokens)
    pieces = _decode(model, model.lock, ids, sampler, router, cancel, cache, spec)
    return pieces if stream else _merged(pieces)


def prompt_ids(model, messages: list[dict], think: str = "none", tools: list[dict] | None = None) -> list[int]:
    """The token ids chat() feeds for these messages (checked by check_messages)."""
    return model.tokenizer.encode(encode_messages(check_messages(messages), think=think, tools=tools))


def shared_prefix(cache, ids: list[int]) -> int:
    """How many leading tokens of ids the cache already holds."""
    seen = cache.token_ids
    n = min(seen.size, len(ids))
    differ = np.flatnonzero(seen[:n] != np.asarray(ids[:n]))
    return int(differ[0]) if differ.size else n


def _reuse_prefix(model, cache, prompt_ids: list[int]) -> int:
    """Roll cache back to the longest prefix it shares with prompt_ids (keeping at least one token to feed, for
    the logits); returns that prefix's length."""
    keep = min(shared_prefix(cache, prompt_ids), len(prompt_ids) - 1)
    if keep < cache.pos:
        model.truncate(keep, cache=cache)
    return keep


def _decode(model, lock: threading.Lock, prompt_ids: list[int], sampler: Sampler, router: TokenRouter,
            cancel: threading.Event | None, cache, spec=None) -> Iterator[ChatPiece]:
    cache = model.new_cache() if cache is None else cache
    if spec is not None and spec.type != "none":
        yield from _decode_speculative(model, lock, prompt_ids, sampler, router, cancel, cache, spec)
        return
    history = list(prompt_ids)
    generated: list[int] = []
    row = None
    cached = 0
    while router.finish_reason is None:
        if cancel is not None and cancel.is_set():
            yield from router.finish("cancelled")
            break
        if row is None:
            with lock:
                cached = _reuse_prefix(model, cache, prompt_ids)
                row = model.forward(prompt_ids[cached:], cache=cache, logits="last")[-1]
            continue
        token = sampler(row, history)
        history.append(token)
        generated.append(token)
        yield from router.feed(token)
        if router.finish_reason is not None:
            break
        if cache.pos >= model.ctx:
            yield from router.finish("length")
            break
        with lock:
            row = model.forward([token], cache=cache, logits="last")[-1]
    yield ChatPiece("done", finish_reason=router.finish_reason, prompt_tokens=len(prompt_ids), cached_tokens=cached,
                    completion_tokens=len(generated), token_ids=generated)


def _decode_speculative(model, lock, prompt_ids: list[int], sampler: Sampler, router: TokenRouter,
                        cancel: threading.Event | None, cache, spec) -> Iterator[ChatPiece]:
    """_decode's loop with the tokens from a Speculator: the same tokens, stops and cache afterwards (the prompt
    and every token but the last), several tokens per forward pass."""
    from flashlite.speculative import Speculator

    generated: list[int] = []
    cached = 0
    tokens = None
    try:
        if cancel is not None and cancel.is_set():
            yield from router.finish("cancelled")
        else:
            with lock:
                cached = _reuse_prefix(model, cache, prompt_ids)
                speculator = Speculator(model, cache, spec, sampler)
            tokens = speculator.tokens(prompt_ids[cached:], list(prompt_ids))
            for token in tokens:
                if cancel is not None and cancel.is_set():  # before each token, as _decode checks
                    yield from router.finish("cancelled")
                    break
                generated.append(token)
                yield from router.feed(token)
                if router.finish_reason is not None:
                    break
                if len(prompt_ids) + len(generated) - 1 >= model.ctx:  # what the cache would hold decoding plainly
                    yield from router.finish("length")
                    break
    finally:
        if tokens is not None:
            tokens.close()
    yield ChatPiece("done", finish_reason=router.finish_reason, prompt_tokens=len(prompt_ids), cached_tokens=cached,
                    completion_tokens=len(generated), token_ids=generated,
                    drafted_tokens=speculator.drafted if tokens is not None else 0,
                    accepted_tokens=speculator.accepted if tokens is not None else 0)


def _merged(pieces) -> list[ChatPiece]:
    out: list[ChatPiece] = []
    for piece in pieces:
        if out and piece.kind in ("reasoning", "content") and out[-1].kind == piece.kind:
            out[-1].text += piece.text
        else:
            out.append(piece)
    return out


def _openai_call(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": dict(call["function"])}
    return out if index is None else {"index": index, **out}


def _usage(done: ChatPiece) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def create_chat_completion(model, messages: list[dict], stream: bool = False, think: str = "none",
                           tools: list[dict] | None = None, max_tokens: int | None = None, temperature: float = 1.0,
                           top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                           seed: int | None = None, stop=None, cancel: threading.Event | None = None, cache=None,
                           spec_type: str | None = None, spec_draft_n_max: int | None = None, model_draft=None):
    """An OpenAI `chat.completion` dict, or with stream=True an iterator of `chat.completion.chunk` dicts (the
    role first, then content / reasoning_content / tool_calls deltas, the finish_reason and usage last).
    `cache`: as for chat(), a conversation's cache reused from turn to turn; spec_*, model_draft: as for chat()."""
    pieces = chat(model, messages, think=think, stream=True, cancel=cancel, tools=tools, max_tokens=max_tokens,
                  stop=stop, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed, cache=cache, spec_type=spec_type,
                  spec_draft_n_max=spec_draft_n_max, model_draft=model_draft)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model.file.get("general.name") or os.path.basename(model.file.path)}
    return _chunks(pieces, head) if stream else _completion(pieces, head)


def _completion(pieces, head: dict) -> dict:
    text = {"reasoning": "", "content": ""}
    calls: list[dict] = []
    done = None
    for piece in pieces:
        if piece.kind == "tool_call":
            calls.append(_openai_call(piece.tool_call))
        elif piece.kind == "done":
            done = piece
        else:
            text[piece.kind] += piece.text
    message = {"role": "assistant", "content": text["content"] if text["content"] or not calls else None,
               "reasoning_content": text["reasoning"] or None, "tool_calls": calls or None}
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason}],
            "usage": _usage(done)}


def _chunks(pieces, head: dict) -> Iterator[dict]:
    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    for piece in pieces:
        if piece.kind == "done":
            yield {**chunk({}, piece.finish_reason), "usage": _usage(piece)}
        elif piece.kind == "tool_call":
            yield chunk({"tool_calls": [_openai_call(piece.tool_call, n_calls)]})
            n_calls += 1
        elif piece.text:
            yield chunk({"reasoning_content" if piece.kind == "reasoning" else "content": piece.text})
