"""V4 chat encoding against strings derived by hand from DeepSeek's REF `encoding/encoding_dsv4.py`.

Each case names the REF branch it covers (`render_message`, `encode_messages`, `merge_tool_messages`,
`sort_tool_results_by_call_order`, `_drop_thinking_messages`, `parse_message_from_completion_text`)."""
from __future__ import annotations

import json
import random

import pytest

from flashlite.chat.template import (
    JINJA_TEMPLATE,
    ChatFormatError,
    OutputParser,
    encode_messages,
    parse_completion,
    render_tool_calls,
)

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"
MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
WEATHER = {"name": "get_weather", "description": "天气 lookup",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
# REF TOOLS_TEMPLATE with dsml_token, thinking tokens and one schema (json.dumps, ensure_ascii=False) filled in.
TOOLS_TEXT = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    "writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n"
    "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, "
    "arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n"
    '{"name": "get_weather", "description": "天气 lookup", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}'
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


def _call(call_id, name, args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CALLS = [_call("c1", "get_weather", {"city": "Paris", "days": 3}), _call("c2", "get_weather", {"city": "東京"})]
CALLS_TEXT = (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
              f"<{D}parameter name=\"city\" string=\"true\">Paris</{D}parameter>\n"
              f"<{D}parameter name=\"days\" string=\"false\">3</{D}parameter>\n</{D}invoke>\n"
              f"<{D}invoke name=\"get_weather\">\n<{D}parameter name=\"city\" string=\"true\">東京</{D}parameter>\n"
              f"</{D}invoke>\n</{D}tool_calls>")

CASES = [
    # render_message user + transition else-branch (chat mode: thinking_end_token)
    ("chat_single_user", {"messages": [{"role": "user", "content": "hi"}], "think": "none"},
     B + U + "hi" + A + "</think>"),
    # system_msg_template; transition `drop_thinking and thinking and index >= last_user_idx` -> <think>
    ("high_system_user", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                              "think": "high"},
     B + "S" + U + "hi" + A + "<think>"),
    # `index == 0 and thinking_mode == "thinking" and reasoning_effort == 'max'` -> REASONING_EFFORT_MAX
    ("max_prefix", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], "think": "max"},
     B + MAX_PREFIX + "S" + U + "hi" + A + "<think>"),
    # encode_messages with context: no BOS, message 0 not rendered so no effort prefix
    ("max_with_context", {"messages": [{"role": "user", "content": "q2"}], "think": "max",
                              "context": [{"role": "user", "content": "q1"},
                                       {"role": "assistant", "content": "a1", "reasoning_content": "r1"}]},
     U + "q2" + A + "<think>"),
    # _drop_thinking_messages + assistant `index > last_user_idx` false -> thinking_part "" ; earlier transition </think>
    ("high_history_dropped", {"messages": [{"role": "user", "content": "q1"},
                                            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                                            {"role": "user", "content": "q2"}], "think": "high"},
     B + U + "q1" + A + "</think>a1" + E + U + "q2" + A + "<think>"),
    # assistant after the last user: thinking_template(reasoning) + thinking_end_token, then EOS
    ("high_last_assistant_keeps_reasoning", {"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a",
                                                            "reasoning_content": "r"}], "think": "high"},
     B + U + "q" + A + "<think>r</think>a" + E),
    # drop_thinking=False: `not drop_thinking and thinking` -> <think>; assistant `not drop_thinking` keeps reasoning
    ("high_keep_history", {"messages": [{"role": "user", "content": "q1"},
                                         {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                                         {"role": "user", "content": "q2"}], "think": "high", "drop_thinking": False},
     B + U + "q1" + A + "<think>r1</think>a1" + E + U + "q2" + A + "<think>"),
    # chat mode assistant: no thinking_part at all
    ("chat_history", {"messages": [{"role": "user", "content": "q1"},
                                    {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                                    {"role": "user", "content": "q2"}], "think": "none"},
     B + U + "q1" + A + "</think>a1" + E + U + "q2" + A + "</think>"),
    # system with tools: content + "\n\n" + render_tools(...)
    ("tools_on_system", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "w?"}],
                             "think": "none", "tools": TOOLS},
     B + "S\n\n" + TOOLS_TEXT + U + "w?" + A + "</think>"),
    # tools without a system message: an empty system carries them (content "" + "\n\n" + tools)
    ("tools_without_system", {"messages": [{"role": "user", "content": "w?"}], "think": "max", "tools": TOOLS},
     B + MAX_PREFIX + "\n\n" + TOOLS_TEXT + U + "w?" + A + "<think>"),
    # tool calls (tool_calls_template, encode_arguments_to_dsml), merge_tool_messages into one user turn,
    # sort_tool_results_by_call_order (results given c2, c1), tools turn drop_thinking off -> reasoning kept
    ("tool_round_trip", {"messages": [{"role": "user", "content": "w?"},
                                       {"role": "assistant", "content": "", "reasoning_content": "need data",
                                        "tool_calls": CALLS},
                                       {"role": "tool", "tool_call_id": "c2", "content": "rain"},
                                       {"role": "tool", "tool_call_id": "c1", "content": "sun"}],
                             "think": "high", "tools": TOOLS},
     B + "\n\n" + TOOLS_TEXT + U + "w?" + A + "<think>need data</think>" + CALLS_TEXT + E
     + U + "<tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result>" + A + "<think>"),
    # the same turn without tools: drop_thinking applies, the call turn is history (tool results count as user)
    ("tool_calls_history_dropped", {"messages": [{"role": "user", "content": "w?"},
                                                  {"role": "assistant", "content": "", "reasoning_content": "x",
                                                   "tool_calls": CALLS[:1]},
                                                  {"role": "tool", "tool_call_id": "c1", "content": "sun"}],
                                        "think": "high"},
     B + U + "w?" + A + "</think>" + CALLS_TEXT.split(f"\n<{D}invoke name=\"get_weather\">\n<{D}parameter name=\"city\""
                                                       " string=\"true\">東京")[0] + f"\n</{D}tool_calls>" + E
     + U + "<tool_result>sun</tool_result>" + A + "<think>"),
    # merge_tool_messages: consecutive users become one turn joined by a blank line
    ("consecutive_users", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                               "think": "none"},
     B + U + "a\n\nb" + A + "</think>"),
    # latest_reminder: LATEST_REMINDER_SP_TOKEN + content; the user before it still gets the transition
    ("latest_reminder", {"messages": [{"role": "user", "content": "u"}, {"role": "latest_reminder", "content": "R"}],
                             "think": "none"},
     B + U + "u" + A + "</think><｜latest_reminder｜>R"),
    # developer: USER_SP_TOKEN + content; before the last user _drop_thinking_messages removes it
    ("developer_dropped", {"messages": [{"role": "developer", "content": "dev"},
                                         {"role": "assistant", "content": "a"},
                                         {"role": "user", "content": "q"}], "think": "high"},
     B + "a" + E + U + "q" + A + "<think>"),
    ("developer_last", {"messages": [{"role": "developer", "content": "dev"}], "think": "high"},
     B + U + "dev" + A + "<think>"),
    # task: non-action appends the task token; action appends Assistant + think token + <｜action｜>
    ("task_title", {"messages": [{"role": "user", "content": "u", "task": "title"}], "think": "high"},
     B + U + "u<｜title｜>"),
    ("task_action", {"messages": [{"role": "user", "content": "u", "task": "action"}], "think": "none"},
     B + U + "u" + A + "</think><｜action｜>"),
    # prev_has_task: the assistant answering a task gets no thinking part, even in thinking mode
    ("task_answer", {"messages": [{"role": "user", "content": "u", "task": "query"},
                                   {"role": "assistant", "content": "ans"}], "think": "high"},
     B + U + "u<｜query｜>ans" + E),
    # response_format on system: "\n\n" + response_format_template
    ("response_format", {"messages": [{"role": "system", "content": "S", "response_format": {"type": "json"}},
                                       {"role": "user", "content": "q"}], "think": "none"},
     B + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
         '{"type": "json"}' + U + "q" + A + "</think>"),
    # encode_arguments_to_dsml: arguments that are not JSON become one string parameter "arguments"
    ("non_json_arguments", {"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "ok", "tool_calls": [
                                              {"type": "function", "function": {"name": "f", "arguments": "raw"}}]}],
                                "think": "none"},
     B + U + "q" + A + "</think>ok" + f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n"
     f"<{D}parameter name=\"arguments\" string=\"true\">raw</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>" + E),
    # wo_eos: assistant_msg_wo_eos_template (a prefilled, unfinished answer)
    ("wo_eos", {"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "The answer is", "wo_eos": True}], "think": "none"},
     B + U + "q" + A + "</think>The answer is"),
]


@pytest.mark.parametrize("name,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_encode_matches_ref(name, kwargs, expected):
    assert encode_messages(**kwargs) == expected


def test_encode_does_not_mutate_input():
    messages = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": CALLS},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"}, {"role": "tool", "tool_call_id": "c1",
                                                                            "content": "sun"}]
    before = json.dumps(messages)
    encode_messages(messages, think="high", tools=TOOLS)
    assert json.dumps(messages) == before


def test_bad_input_is_named():
    with pytest.raises(ChatFormatError, match="think"):
        encode_messages([{"role": "user", "content": "x"}], think="low")
    with pytest.raises(ChatFormatError, match="unknown role"):
        encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="unknown task"):
        encode_messages([{"role": "user", "content": "x", "task": "nope"}])
    with pytest.raises(ChatFormatError, match="messages"):
        encode_messages("hello")


JINJA_CASES = [c for c in CASES if c[0] in {
    "chat_single_user", "high_system_user", "max_prefix", "high_history_dropped", "high_last_assistant_keeps_reasoning",
    "high_keep_history", "chat_history", "tools_on_system", "tools_without_system", "consecutive_users",
    "latest_reminder"}]


@pytest.mark.parametrize("name,kwargs,expected", JINJA_CASES, ids=[c[0] for c in JINJA_CASES])
def test_jinja_template_renders_the_same(name, kwargs, expected):
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)  # as transformers' chat template env
    env.filters["from_json"] = json.loads
    think = kwargs.get("think", "none")
    out = env.from_string(JINJA_TEMPLATE).render(
        messages=kwargs["messages"], tools=kwargs.get("tools"), bos_token=B, add_generation_prompt=True,
        thinking=think != "none", reasoning_effort={"none": None, "high": "high", "max": "max"}[think],
        drop_thinking=kwargs.get("drop_thinking", True))
    assert out == expected


def test_jinja_template_renders_tool_round_trip():
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["from_json"] = json.loads
    messages = [{"role": "user", "content": "w?"},
                {"role": "assistant", "content": "", "reasoning_content": "need data", "tool_calls": CALLS},
                {"role": "tool", "tool_call_id": "c1", "content": "sun"},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    out = env.from_string(JINJA_TEMPLATE).render(messages=messages, tools=TOOLS, bos_token=B,
                                                 add_generation_prompt=True, thinking=True)
    assert out == encode_messages(messages, think="high", tools=TOOLS)


# ---- output parsing ---------------------------------------------------------------------------------------------

OUTPUTS = [
    ("high", "Let me think. 1<2 and </thi is not a tag.</think>The answer is **4**.\n\n" + E,
     "Let me think. 1<2 and </thi is not a tag.", "The answer is **4**.\n\n", []),
    ("none", "Plain answer with <b>html</b> and \n\n< not a call." + E, "", "Plain answer with <b>html</b> and \n\n< not a call.", []),
    ("high", "I need the weather.</think>Checking." + CALLS_TEXT + E, "I need the weather.", "Checking.",
     [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
      {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}}]),
    ("max", "r</think>" + CALLS_TEXT, "r", "",
     [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
      {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}}]),
    ("none", "no EOS because generation stopped on the EOS id", "", "no EOS because generation stopped on the EOS id", []),
]


@pytest.mark.parametrize("think,text,reasoning,content,calls", OUTPUTS)
def test_parse_completion(think, text, reasoning, content, calls):
    msg = parse_completion(text, think)
    assert (msg["reasoning_content"], msg["content"], msg["tool_calls"]) == (reasoning, content, calls)


def _stream(think, pieces):
    parser = OutputParser(think)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [e.tool_call for e in events if e.kind == "tool_call"]
    for e in events:
        for marker in ("<think>", "</think>", "｜DSML｜", "<｜end▁of▁sentence｜>", "tool_calls>"):
            assert marker not in e.text
    return reasoning, content, calls


@pytest.mark.parametrize("think,text,reasoning,content,calls", OUTPUTS)
def test_stream_parser_any_split(think, text, reasoning, content, calls):
    assert _stream(think, [text]) == (reasoning, content, calls)
    assert _stream(think, list(text)) == (reasoning, content, calls)
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _stream(think, pieces) == (reasoning, content, calls)


def test_stream_parser_emits_before_the_end():
    parser = OutputParser("high")
    assert [(e.kind, e.text) for e in parser.feed("<think>abc</th")] == [("reasoning", "abc")]
    assert [(e.kind, e.text) for e in parser.feed("ink>Hi <")] == [("content", "Hi ")]
    assert [(e.kind, e.text) for e in parser.feed("b>")] == [("content", "<b>")]
    assert [(e.kind, e.text) for e in parser.feed("\n\n")] == []
    assert [(e.kind, e.text) for e in parser.feed(f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>")] == \
        [("tool_call", "")]
    assert parser.tool_calls == [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]


def test_tool_calls_round_trip_through_the_parser():
    text = "</think>" + render_tool_calls(CALLS) + E
    assert [c["function"] for c in parse_completion(text, "high")["tool_calls"]] == \
        [{"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
         {"name": "get_weather", "arguments": '{"city": "東京"}'}]


def test_parse_completion_rejects_bad_output():
    with pytest.raises(ChatFormatError, match="</think>"):
        parse_completion("reasoning without end" + E, "high")
    with pytest.raises(ChatFormatError, match="after EOS"):
        parse_completion("a" + E + "b", "none")
    with pytest.raises(ChatFormatError, match="stray"):
        parse_completion("a <think> b" + E, "none")
    with pytest.raises(ChatFormatError, match="not closed"):
        parse_completion("a" + f"\n\n<{D}tool_calls>\n", "none")
