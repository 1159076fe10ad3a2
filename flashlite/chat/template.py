"""DeepSeek V4's chat encoding (DeepSeek's REF `encoding/encoding_dsv4.py`) and the parser of its output.

`encode_messages` renders OpenAI-style messages byte for byte as REF's `encode_messages` does; `OutputParser`
turns generated text, piece by piece, into reasoning / content / tool-call events with no markup leaking.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}
THINK_MODES = ("none", "high", "max")

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
TOOLS_HEADER = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f"writing a \"<{DSML}tool_calls>\" block like the following:\n\n"
    f"<{DSML}tool_calls>\n<{DSML}invoke name=\"$TOOL_NAME\">\n"
    f"<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{DSML}parameter>\n"
    f"...\n</{DSML}invoke>\n<{DSML}invoke name=\"$TOOL_NAME2\">\n...\n</{DSML}invoke>\n</{DSML}tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

class ChatFormatError(ValueError):
    """A message list the V4 encoding cannot render, or model output that is not V4 markup."""


def _jinja_str(text: str, raw: bool = False) -> str:
    """`text` as a Jinja string literal, wrapped in an output tag unless `raw`."""
    literal = "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    return literal if raw else "{{- " + literal + " -}}"


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict]) -> str:
    """The `## Tools` section for OpenAI-style tools ({"type": "function", "function": {...}})."""
    try:
        schemas = [_json(t["function"]) for t in tools]
    except (KeyError, TypeError) as exc:
        raise ChatFormatError(f"tools: each tool needs a 'function' object ({exc})") from exc
    return TOOLS_HEADER + "\n".join(schemas) + TOOLS_FOOTER


def _arguments(call: dict) -> dict:
    """A tool call's arguments: REF parses the OpenAI JSON string and wraps text that is not JSON."""
    try:
        raw = call["function"]["arguments"]
    except (KeyError, TypeError) as exc:
        raise ChatFormatError(f"tool_calls: each call needs function.arguments ({exc})") from exc
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw)
    except (TypeError, ValueError):
        return {"arguments": raw}
    if not isinstance(args, dict):
        raise ChatFormatError(f"tool_calls: arguments must be a JSON object, got {raw!r}")
    return args


def render_tool_calls(tool_calls: list[dict]) -> str:
    """REF's DSML block, led by the blank line that `parse` also expects."""
    invokes = []
    for call in tool_calls:
        params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in _arguments(call).items()]
        invokes.append(f'<{DSML}invoke name="{call["function"]["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _merge_tool_messages(messages: list[dict]) -> list[dict]:
    """REF: V4 has no tool role; tool results and consecutive user texts fold into one user message's blocks."""
    merged: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        prev_user = merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if prev_user:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if prev_user and merged[-1].get("task") is None:
                merged[-1]["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                new.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[dict]) -> list[dict]:
    """REF: tool results inside a user message follow the order of the preceding assistant's calls."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(ranked) if b.get("type") == "tool_result" else b
                                         for b in msg["content_blocks"]]
    return messages


def _drop_thinking(messages: list[dict]) -> list[dict]:
    """REF: before the last user turn, assistants lose their reasoning and developer messages disappear."""
    last_user = _last_user_index(messages)
    keep = {"user", "system", "tool", "latest_reminder", "direct_search_results"}
    out = []
    for i, msg in enumerate(messages):
        if msg.get("role") in keep or i >= last_user:
            out.append(msg)
        elif msg.get("role") == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            out.append(msg)
    return out


def _tool_result_text(content) -> str:
    if isinstance(content, list):
        return "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                           for b in content)
    return content


def _user_text(msg: dict) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return msg.get("content") or ""
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", "") or "")
        elif kind == "tool_result":
            parts.append(f"<tool_result>{_tool_result_text(block.get('content', ''))}</tool_result>")
        else:
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)


def _render(index: int, messages: list[dict], thinking: bool, drop_thinking: bool, effort: str | None) -> str:
    """REF `render_message`: one message, then the hand-over to the assistant when the turn ends here."""
    msg = messages[index]
    role = msg.get("role")
    content = msg.get("content")
    last_user = _last_user_index(messages)
    out = REASONING_EFFORT_MAX if index == 0 and thinking and effort == "max" else ""

    def extras() -> str:
        text = "\n\n" + render_tools(msg["tools"]) if msg.get("tools") else ""
        if msg.get("response_format"):
            text += "\n\n" + RESPONSE_FORMAT + _json(msg["response_format"])
        return text

    if role == "system":
        out += (content or "") + extras()
    elif role == "developer":
        if not content:
            raise ChatFormatError(f"messages[{index}]: a developer message needs content")
        out += USER + content + extras()
    elif role == "user":
        out += USER + _user_text(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + (content or "")
    elif role == "assistant":
        calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
        reasoning = ""
        after_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking and not after_task and (not drop_thinking or index > last_user):
            reasoning = (msg.get("reasoning_content") or "") + THINK_END
        out += reasoning + (content or "") + calls + ("" if msg.get("wo_eos", False) else EOS)
    else:
        raise ChatFormatError(f"messages[{index}]: unknown role {role!r}")

    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ChatFormatError(f"messages[{index}]: unknown task {task!r} (valid: {sorted(TASK_TOKENS)})")
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop_thinking or index >= last_user)
        out += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return out


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """REF reads tools from a system message: they join the first one, or an empty one put in front."""
    if not tools:
        return list(messages)
    if messages and messages[0].get("role") == "system":
        return [dict(messages[0], tools=tools)] + list(messages[1:])
    return [{"role": "system", "content": "", "tools": tools}] + list(messages)


def encode_messages(messages: list[dict], think: str = "none", tools: list[dict] | None = None,
                    context: list[dict] | None = None, drop_thinking: bool = True, add_bos: bool = True) -> str:
    """The V4 prompt for OpenAI-style `messages`, byte for byte as REF `encode_messages` renders it.

    `think`: "none" (REF thinking_mode "chat"), "high" ("thinking", effort "high") or "max" ("thinking" with
    the reasoning-effort prefix). `tools`: OpenAI tool definitions. `context`: earlier messages already in the
    KV cache; only `messages` are rendered, without BOS."""
    if think not in THINK_MODES:
        raise ChatFormatError(f"think: {think!r} is not one of {THINK_MODES}")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatFormatError("messages: expected a list of dicts with a 'role'")
    thinking = think != "none"
    effort = "max" if think == "max" else ("high" if thinking else None)
    context = list(context or [])
    messages = _with_tools(messages, tools)

    merged = _merge_tool_messages(messages)
    merged = _sort_tool_results(context + merged)[len(context):]
    if context:
        context = _sort_tool_results(_merge_tool_messages(context))
    full = context + merged
    prompt = BOS if add_bos and not context else ""

    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        full = _drop_thinking(full)
        start = len(_drop_thinking(context))
    else:
        start = len(context)
    for index in range(start, len(full)):
        prompt += _render(index, full, thinking, drop, effort)
    return prompt


# ---- output parsing ---------------------------------------------------------------------------------------------

_INVOKE = re.compile(rf'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


def _tool_call(name: str, body: str) -> dict:
    """An OpenAI-style call; arguments are the JSON text REF's `decode_dsml_to_arguments` builds."""
    params = []
    seen = set()
    for key, is_str, value in _PARAM.findall(body):
        if key in seen:
            raise ChatFormatError(f"tool call {name!r}: duplicate parameter {key!r}")
        seen.add(key)
        params.append(f"{_json(key)}: {_json(value) if is_str == 'true' else value}")
    return {"type": "function", "function": {"name": name, "arguments": "{" + ", ".join(params) + "}"}}


def parse_tool_calls(block: str) -> list[dict]:
    """The calls of a DSML block's inside (between `<｜DSML｜tool_calls>` and its end tag)."""
    return [_tool_call(name, body) for name, body in _INVOKE.findall(block)]


def parse_completion(text: str, think: str = "none") -> dict:
    """A whole completion (ending in EOS) as REF's `parse_message_from_completion_text` reads it; strict."""
    reasoning = ""
    if think != "none":
        end = text.find(THINK_END)
        if end < 0:
            raise ChatFormatError("completion: reasoning is not closed by </think>")
        reasoning, text = text[:end], text[end + len(THINK_END):]
    calls: list[dict] = []
    start = text.find(TOOL_CALLS_START)
    eos = text.find(EOS)
    if start >= 0 and (eos < 0 or start < eos):
        content, rest = text[:start], text[start + len(TOOL_CALLS_START):]
        close = rest.find(TOOL_CALLS_END)
        if close < 0:
            raise ChatFormatError("completion: tool calls block is not closed")
        calls = parse_tool_calls(rest[:close])
        tail = rest[close + len(TOOL_CALLS_END):]
        if tail not in ("", EOS):
            raise ChatFormatError(f"completion: unexpected text after the tool calls: {tail[:40]!r}")
    elif eos >= 0:
        content = text[:eos]
        if text[eos + len(EOS):]:
            raise ChatFormatError("completion: text after EOS")
    else:
        content = text
    for marker in (BOS, EOS, THINK_START, THINK_END, DSML):
        if marker in content or marker in reasoning:
            raise ChatFormatError(f"completion: stray {marker!r} in the text")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


@dataclass
class Event:
    """One parsed output item: text of kind "reasoning" or "content", or a finished "tool_call"."""

    kind: str
    text: str = ""
    tool_call: dict | None = field(default=None)


def _held_prefix(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `buf` that could still grow into one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), best, -1):
            if marker.startswith(buf[-n:]):
                best = n
                break
    return best


class OutputParser:
    """Streams generated text into events: reasoning until </think>, then content, tool calls as they close.

    Markers split across pieces are held back until they resolve, so no markup reaches reasoning or content."""

    _CALLS_OPEN = f"<{DSML}tool_calls>"
    _INVOKE_END = f"</{DSML}invoke>"

    def __init__(self, think: str = "none"):
        if think not in THINK_MODES:
            raise ChatFormatError(f"think: {think!r} is not one of {THINK_MODES}")
        self.state = "reasoning" if think != "none" else "content"
        self._buf = ""
        self._at_start = True
        self.tool_calls: list[dict] = []

    def feed(self, piece: str) -> list[Event]:
        self._buf += piece
        events: list[Event] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        """Events for what is still held at the end of generation."""
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        if self._buf and self.state in ("reasoning", "content"):
            events.append(Event(self.state, self._buf))
        self._buf = ""
        return events

    def _emit(self, events: list[Event], kind: str, text: str) -> None:
        if text:
            if events and events[-1].kind == kind:
                events[-1].text += text
            else:
                events.append(Event(kind, text))

    def _step(self, events: list[Event], final: bool) -> bool:
        """Consume what can be decided now; True when the state changed and another pass may consume more."""
        buf = self._buf
        if self.state == "done":
            self._buf = ""
            return False
        if self.state == "reasoning":
            if self._at_start:
                if THINK_START.startswith(buf) and not final:
                    return False
                self._at_start = False
                if buf.startswith(THINK_START):
                    self._buf = buf = buf[len(THINK_START):]
            return self._text_until(events, "reasoning", (THINK_END, EOS), final)
        if self.state == "content":
            return self._text_until(events, "content", (TOOL_CALLS_START, self._CALLS_OPEN, EOS), final)
        end = buf.find(TOOL_CALLS_END)
        while True:
            close = buf.find(self._INVOKE_END)
            if close < 0 or (0 <= end < close):
                break
            for name, body in _INVOKE.findall(buf[:close + len(self._INVOKE_END)]):
                call = _tool_call(name, body)
                self.tool_calls.append(call)
                events.append(Event("tool_call", tool_call=call))
            buf = buf[close + len(self._INVOKE_END):]
            end = buf.find(TOOL_CALLS_END)
        self._buf = buf
        if end >= 0:
            rest = buf[end + len(TOOL_CALLS_END):]
            self._buf, self.state = rest, "content"
            return True
        return False

    def _text_until(self, events: list[Event], kind: str, markers: tuple[str, ...], final: bool) -> bool:
        buf = self._buf
        hits = [(buf.find(m), m) for m in markers if m in buf]
        if hits:
            pos, marker = min(hits)
            self._emit(events, kind, buf[:pos])
            self._buf = buf[pos + len(marker):]
            self.state = ("content" if marker == THINK_END else "done" if marker == EOS else "tool_calls")
            return True
        keep = 0 if final else _held_prefix(buf, markers)
        self._emit(events, kind, buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False


# ---- Jinja template ---------------------------------------------------------------------------------------------

# The same rendering as a Jinja chat template, written into GGUFs for llama.cpp-style runtimes. It covers system,
# user, tool, assistant (reasoning_content, content, tool_calls) and latest_reminder messages with the kwargs
# `thinking` (or `enable_thinking`), `reasoning_effort`, `drop_thinking` and `tools`; tool results are assumed to
# come in call order. JSON goes through the runtime's `tojson`, which must print like Python's json.dumps.
JINJA_TEMPLATE = (
    "{%- set thinking = thinking if thinking is defined else (enable_thinking if enable_thinking is defined "
    "else false) -%}"
    "{%- set effort = reasoning_effort if reasoning_effort is defined else none -%}"
    "{%- set has_tools = tools is defined and tools -%}"
    "{%- set drop = (drop_thinking if drop_thinking is defined else true) and not has_tools -%}"
    "{%- set gen = add_generation_prompt if add_generation_prompt is defined else true -%}"
    "{%- set ns = namespace(last_user=-1, in_user=false, after_task=false) -%}"
    "{%- for m in messages -%}{%- if m.role in ['user', 'tool'] -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if thinking and effort == 'max' and (messages or has_tools) -%}" + _jinja_str(REASONING_EFFORT_MAX)
    + "{%- endif -%}"
    "{%- set tools_text = '' -%}"
    "{%- if has_tools -%}{%- set ts = namespace(items=[]) -%}{%- for t in tools -%}"
    "{%- set ts.items = ts.items + [t.function | tojson] -%}{%- endfor -%}"
    "{%- set tools_text = '\\n\\n' + " + _jinja_str(TOOLS_HEADER, raw=True)
    + " + ts.items | join('\\n') + " + _jinja_str(TOOLS_FOOTER, raw=True) + " -%}"
    "{%- if not messages or messages[0].role != 'system' -%}{{- tools_text -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role in ['user', 'tool'] -%}"
    "{%- if ns.in_user -%}{{- '\\n\\n' -}}{%- else -%}{{- '" + USER + "' -}}{%- set ns.in_user = true -%}"
    "{%- endif -%}"
    "{%- if m.role == 'tool' -%}{{- '<tool_result>' + (m.content or '') + '</tool_result>' -}}"
    "{%- else -%}{{- m.content or '' -}}{%- endif -%}"
    "{%- set next = messages[loop.index0 + 1].role if not loop.last else none -%}"
    "{%- if next not in ['user', 'tool'] -%}{%- set ns.in_user = false -%}{%- endif -%}"
    "{%- if next in ['assistant', 'latest_reminder'] or (loop.last and gen) -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- if thinking and (not drop or loop.index0 >= ns.last_user) -%}{{- '" + THINK_START + "' -}}"
    "{%- else -%}{{- '" + THINK_END + "' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- elif m.role == 'system' -%}"
    "{{- m.content or '' -}}{%- if loop.first -%}{{- tools_text -}}{%- endif -%}"
    "{%- elif m.role == 'latest_reminder' -%}"
    "{{- '" + LATEST_REMINDER + "' + (m.content or '') -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if thinking and (not drop or loop.index0 > ns.last_user) -%}"
    "{{- (m.reasoning_content or '') + '" + THINK_END + "' -}}{%- endif -%}"
    "{{- m.content or '' -}}"
    "{%- if m.tool_calls -%}{{- '\\n\\n<" + DSML + "tool_calls>\\n' -}}"
    "{%- for call in m.tool_calls -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<" + DSML + "invoke name=\"' + call.function.name + '\">\\n' -}}"
    "{%- set args = call.function.arguments -%}"
    "{%- if args is string -%}{%- set args = args | from_json -%}{%- endif -%}"
    "{%- for key, value in args.items() -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if value is string -%}"
    "{{- '<" + DSML + "parameter name=\"' + key + '\" string=\"true\">' + value + '</" + DSML + "parameter>' -}}"
    "{%- else -%}"
    "{{- '<" + DSML + "parameter name=\"' + key + '\" string=\"false\">' + (value | tojson) + '</" + DSML
    + "parameter>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{{- '\\n</" + DSML + "invoke>' -}}"
    "{%- endfor -%}"
    "{{- '\\n</" + DSML + "tool_calls>' -}}{%- endif -%}"
    "{{- '" + EOS + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
