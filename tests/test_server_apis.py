"""The server's other APIs, driven by the official clients on the tiny_v4 fixture: OpenAI's /v1/completions and
/v1/models (openai), Anthropic's /v1/messages with thinking, tools and streaming, and /count_tokens (anthropic),
llama-server's /tokenize and /detokenize, /health, HEAD wherever GET works, and /metrics."""
import http.client
import json
import re

import anthropic
import openai
import pytest

from flashlite.chat.completion import ChatPiece, prompt_ids
from flashlite.chat.template import BOS
from serving import serving

MESSAGES = [{"role": "user", "content": "Name three colours."}]
KEY = "s3cret"
GREEDY = {"temperature": 0}  # Anthropic's sampling fields, which its newest client no longer names


@pytest.fixture(scope="module")
def server(model):
    with serving(model, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response, raw


def greedy_text(model, ids, max_tokens):
    """What a greedy generation of max_tokens after ids decodes to (up to EOS)."""
    out = list(model.generate(ids, max_tokens, stop=[model.tokenizer.eos_id]))
    if out and out[-1] == model.tokenizer.eos_id:
        return model.tokenizer.decode(out[:-1]), "stop"
    return model.tokenizer.decode(out), "length"


# ---- OpenAI ----------------------------------------------------------------------------------------------------

def test_completions_are_the_greedy_continuation_in_both_modes(oai, model):
    ids = model.tokenizer.encode(BOS + "The sea is")
    text, finish = greedy_text(model, ids, 12)
    out = oai.completions.create(model="tiny_v4", prompt="The sea is", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny_v4"
    assert out.choices[0].text == text and out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 12
    chunks = list(oai.completions.create(model="tiny_v4", prompt="The sea is", max_tokens=12, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].usage.completion_tokens == \
        out.usage.completion_tokens
    by_ids = oai.completions.create(model="tiny_v4", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text
    default = oai.completions.create(model="tiny_v4", prompt="The sea is", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens


def test_completions_stop_and_bad_fields(oai, model):
    ids = model.tokenizer.encode(BOS + "Once upon")
    text, _ = greedy_text(model, ids, 20)
    stop = text[4:6]
    assume = stop.strip() and text.find(stop) == 4
    out = oai.completions.create(model="tiny_v4", prompt="Once upon", max_tokens=20, temperature=0, stop=[stop])
    if assume:
        assert out.choices[0].text == text[:4] and out.choices[0].finish_reason == "stop"
    for fields, param in [({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [10 ** 9]}, "prompt"),
                          ({"prompt": ["a", "b"]}, "prompt"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
                          ({"suffix": "x"}, "suffix"), ({"logprobs": 2}, "logprobs"), ({"top_p": 0}, "top_p"),
                          ({"prompt": "word " * 3000}, "prompt")]:
        body = {"model": "tiny_v4", "prompt": "hi", **fields}
        with pytest.raises(openai.BadRequestError) as error:
            oai.completions.create(**body)
        assert error.value.param == param, fields
        assert (error.value.code == "context_length_exceeded") == ("word" in json.dumps(fields))


def test_models_and_model_card(oai, model):
    (card,) = oai.models.list().data
    assert card.id == "tiny_v4" and card.owned_by == "flashlite"
    assert oai.models.retrieve("tiny_v4").id == "tiny_v4"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


# ---- Anthropic --------------------------------------------------------------------------------------------------

def _merged(model, messages, **kwargs):
    pieces = model.chat(messages, stream=False, **kwargs)
    text = {"reasoning": "", "content": ""}
    for p in pieces:
        if p.kind in text:
            text[p.kind] += p.text
    return text, pieces[-1]


@pytest.mark.parametrize("thinking, effort, think", [
    (None, None, "none"), ({"type": "disabled"}, None, "none"),
    ({"type": "enabled", "budget_tokens": 1024}, None, "high"), ({"type": "adaptive"}, "max", "max")])
def test_messages_equal_the_chat_api_with_the_v4_modes(claude, model, thinking, effort, think):
    extra = {}
    if thinking is not None:
        extra["thinking"] = thinking
    if effort is not None:
        extra["output_config"] = {"effort": effort}
    out = claude.messages.create(model="tiny_v4", max_tokens=40, system="Be brief.", messages=MESSAGES,
                                 extra_body=GREEDY, **extra)
    system = [{"role": "system", "content": "Be brief."}] + MESSAGES
    expected, done = _merged(model, system, think=think, max_tokens=40, temperature=0)
    kinds = [b.type for b in out.content]
    assert out.type == "message" and out.role == "assistant" and out.model == "tiny_v4"
    assert "".join(b.text for b in out.content if b.type == "text") == expected["content"]
    assert "".join(b.thinking for b in out.content if b.type == "thinking") == expected["reasoning"]
    assert ("thinking" in kinds) == (think != "none" and bool(expected["reasoning"]))
    assert out.usage.output_tokens == done.completion_tokens
    assert out.usage.input_tokens + out.usage.cache_read_input_tokens == done.prompt_tokens
    assert out.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[done.finish_reason]
    count = claude.messages.count_tokens(model="tiny_v4", system="Be brief.", messages=MESSAGES, **extra)
    assert count.input_tokens == len(prompt_ids(model, system, think))


def test_messages_stream_events_build_the_same_message(claude):
    body = dict(model="tiny_v4", max_tokens=30, messages=MESSAGES, extra_body=GREEDY,
                thinking={"type": "enabled", "budget_tokens": 1024})
    whole = claude.messages.create(**body)
    with claude.messages.stream(**body) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop" and "message_delta" in names
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    raw = claude.messages.create(stream=True, **body)
    events = [e.type for e in raw]
    assert events.count("content_block_start") == events.count("content_block_stop") == len(whole.content)


def test_messages_stop_sequences(claude, model):
    plain, _ = _merged(model, MESSAGES, max_tokens=24, temperature=0)
    text = plain["content"]
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()
                 and text.find(text[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip("the greedy answer has no usable stop sequence")
    out = claude.messages.create(model="tiny_v4", max_tokens=24, messages=MESSAGES, extra_body=GREEDY,
                                 stop_sequences=["never-there", stop])
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == stop
    assert out.content[0].text == text[:text.find(stop)]


def test_tool_history_reaches_the_prompt(claude, model):
    schema = {"type": "object", "properties": {"word": {"type": "string"}}}
    tools = [{"name": "lookup", "description": "Look a word up.", "input_schema": schema}]
    history = [{"role": "user", "content": "What is red?"},
               {"role": "assistant", "content": [
                   {"type": "text", "text": "Let me look."},
                   {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"word": "red"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a colour"}]},
                   {"type": "text", "text": "Thanks."}]}]
    same = [{"role": "user", "content": "What is red?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": {"word": "red"}}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "a colour"},
            {"role": "user", "content": "Thanks."}]
    openai_tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                                      "parameters": schema}}]
    count = claude.messages.count_tokens(model="tiny_v4", messages=history, tools=tools)
    assert count.input_tokens == len(prompt_ids(model, same, "none", openai_tools))
    out = claude.messages.create(model="tiny_v4", max_tokens=8, messages=history, tools=tools, extra_body=GREEDY)
    expected, _ = _merged(model, same, tools=openai_tools, max_tokens=8, temperature=0)
    assert "".join(b.text for b in out.content if b.type == "text") == expected["content"]


def test_tool_calls_come_back_as_tool_use_blocks(claude, model, monkeypatch):
    call = {"type": "function", "function": {"name": "lookup", "arguments": '{"word": "red", "n": 2}'}}

    def scripted(messages, **kwargs):
        assert kwargs["tools"][0]["function"]["name"] == "lookup" and kwargs["think"] == "high"
        return iter([ChatPiece("reasoning", "I should look."), ChatPiece("content", "Looking."),
                     ChatPiece("tool_call", tool_call=call),
                     ChatPiece("done", finish_reason="tool_calls", prompt_tokens=9, completion_tokens=7)])

    monkeypatch.setattr(model, "chat", scripted)
    body = dict(model="tiny_v4", max_tokens=2048, messages=MESSAGES, thinking={"type": "enabled", "budget_tokens": 1024},
                tools=[{"name": "lookup", "input_schema": {"type": "object"}}])
    out = claude.messages.create(**body)
    assert [b.type for b in out.content] == ["thinking", "text", "tool_use"]
    assert out.content[0].thinking == "I should look." and out.content[1].text == "Looking."
    assert out.content[2].name == "lookup" and out.content[2].input == {"word": "red", "n": 2}
    assert out.content[2].id.startswith("toolu_") and out.stop_reason == "tool_use"
    with claude.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"word": "red", "n": 2} and final.stop_reason == "tool_use"


@pytest.mark.parametrize("fields, where", [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]}, "messages"),
    ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"output_config": {"effort": "huge"}}, "output_config.effort"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"temperature": "warm"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
])
def test_bad_messages_fields_are_anthropic_400s_naming_them(server, fields, where):
    body = {"model": "tiny_v4", "max_tokens": 16, "messages": MESSAGES, **fields}
    response, raw = call(server, "POST", "/v1/messages", {k: v for k, v in body.items() if v is not None})
    error = json.loads(raw)
    assert response.status == 400 and error["type"] == "error", raw
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"].startswith(where)


def test_anthropic_client_errors_and_api_key(server, model):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0).messages.create(
            model="tiny_v4", max_tokens=4, messages=MESSAGES)
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)  # sent as x-api-key
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model="tiny_v4", max_tokens=4, messages=MESSAGES, extra_body={"top_k": -1})
    assert error.value.body["error"]["message"].startswith("top_k")
    response, raw = call(server, "POST", "/v1/messages/nowhere", {})
    assert response.status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"


# ---- llama-server's extras, health, HEAD, metrics ---------------------------------------------------------------

def test_tokenize_and_detokenize(server, model):
    text = "Hello world <｜User｜>"
    response, raw = call(server, "POST", "/tokenize", {"content": text})
    ids = json.loads(raw)["tokens"]
    assert response.status == 200 and ids == model.tokenizer.encode(text)
    _, raw = call(server, "POST", "/tokenize", {"content": text, "add_special": True, "with_pieces": True})
    pieces = json.loads(raw)["tokens"]
    assert [p["id"] for p in pieces] == [model.tokenizer.bos_id] + ids
    assert "".join(p["piece"] for p in pieces if isinstance(p["piece"], str)) == BOS + text
    _, raw = call(server, "POST", "/tokenize", {"content": text, "parse_special": False})
    assert len(json.loads(raw)["tokens"]) > len(ids)
    response, raw = call(server, "POST", "/detokenize", {"tokens": ids})
    assert response.status == 200 and json.loads(raw) == {"content": text}
    for body, param in [({"tokens": [1.5]}, "tokens"), ({"tokens": [-1]}, "tokens"), ({"content": 3}, "content")]:
        response, raw = call(server, "POST", "/detokenize" if "tokens" in body else "/tokenize", body)
        assert response.status == 400 and json.loads(raw)["error"]["param"] == param


def test_head_wherever_get_works(server):
    for path in ("/health", "/v1/health", "/v1/models", "/v1/models/tiny_v4", "/metrics"):
        got, body = call(server, "GET", path)
        head, empty = call(server, "HEAD", path)
        assert got.status == head.status == 200 and empty == b"" and body, path
        assert head.getheader("content-type") == got.getheader("content-type")
    response, _ = call(server, "HEAD", "/v1/chat/completions")
    assert response.status == 405


def test_health_needs_no_key_the_rest_does(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    for path, status in [("/health", 200), ("/metrics", 401), ("/v1/models", 401)]:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == status, path


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^flashlite_{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"no {name}{labels} in\n{text}"
    return float(match.group(1))


def test_metrics_count_tokens_requests_and_the_expert_cache(server, oai):
    before = call(server, "GET", "/metrics")[1].decode()
    out = oai.chat.completions.create(model="tiny_v4", messages=MESSAGES, max_tokens=6, temperature=0, stream=False)
    response, raw = call(server, "GET", "/metrics")
    text = raw.decode()
    assert response.status == 200 and response.getheader("content-type").startswith("text/plain")
    for name in ("generation_tokens_total", "prompt_tokens_total"):
        key = "completion_tokens" if name.startswith("generation") else "prompt_tokens"
        assert _metric(text, name) - _metric(before, name) == getattr(out.usage, key)
    assert _metric(text, "requests_total", '{route="/v1/chat/completions",status="200"}') >= 1
    for name in ("requests_active", "requests_queued", "slots", "expert_cache_hits_total",
                 "expert_cache_misses_total", "generation_tokens_per_second", "prompt_tokens_per_second",
                 "connections"):
        assert _metric(text, name) >= 0
    assert _metric(text, "slots") == 4
    stream = oai.chat.completions.create(model="tiny_v4", messages=MESSAGES, max_tokens=6, stream=True)
    list(stream)
    assert _metric(call(server, "GET", "/metrics")[1].decode(), "generation_tokens_per_second") > 0


def test_api_doc_anthropic_example_runs(server):
    from pathlib import Path
    import subprocess
    import sys

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", doc, re.DOTALL) if "import anthropic" in block]
    code = code.replace("http://127.0.0.1:8080", server.url).replace('"KEY"', repr(KEY))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "output_tokens=" in run.stdout
