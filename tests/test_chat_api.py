"""The app-facing chat API on the tiny_v4 fixture: sampling reproducibility, greedy equivalence with
Model.generate, OpenAI dict shapes and counts, streaming, limits, cancellation, and the token -> piece routing."""
import threading
from pathlib import Path

import pytest

from flashlite.chat.completion import ChatPiece, TokenRouter, chat
from flashlite.chat.template import encode_messages

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v4"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


def _done(pieces) -> ChatPiece:
    pieces = list(pieces)
    assert pieces[-1].kind == "done" and all(p.kind != "done" for p in pieces[:-1])
    return pieces[-1]


def _prompt_ids(model, think="none"):
    return model.tokenizer.encode(encode_messages(MESSAGES, think=think))


def test_same_seed_same_output_and_other_seed_differs(model):
    runs = [_done(chat(model, MESSAGES, max_tokens=12, seed=s)).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_temperature_zero_is_model_generate(model):
    eos = model.tokenizer.eos_id
    expected = list(model.generate(_prompt_ids(model), 16, stop=(eos,)))
    done = _done(model.chat(MESSAGES, temperature=0, max_tokens=16))
    assert done.token_ids == expected
    assert done.finish_reason == ("stop" if expected[-1] == eos else "length")


def test_completion_dict_shape_and_usage(model):
    out = model.create_chat_completion(MESSAGES, max_tokens=10, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"]
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert set(choice["message"]) == {"role", "content", "reasoning_content", "tool_calls"}
    done = _done(chat(model, MESSAGES, max_tokens=10, temperature=0))
    assert choice["finish_reason"] == done.finish_reason
    n_prompt = len(_prompt_ids(model))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(done.token_ids),
                            "total_tokens": n_prompt + len(done.token_ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert 1 <= len(done.token_ids) <= 10
    text = model.tokenizer.decode(done.token_ids)
    assert text.startswith(choice["message"]["content"])


def test_stream_chunks_concatenate_to_the_completion(model):
    whole = model.create_chat_completion(MESSAGES, max_tokens=20, seed=3)
    chunks = list(model.create_chat_completion(MESSAGES, max_tokens=20, seed=3, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == (whole["choices"][0]["message"]["content"] or "")


def test_max_tokens_finishes_with_length(model):
    # sample away from EOS so the limit, not the model, ends the answer
    pieces = list(chat(model, MESSAGES, max_tokens=5, seed=1, stop=None))
    done = _done(pieces)
    if model.tokenizer.eos_id in done.token_ids:
        pytest.skip("the fixture happened to sample EOS within 5 tokens")
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    assert model.create_chat_completion(MESSAGES, max_tokens=5, seed=1)["choices"][0]["finish_reason"] == "length"


def test_cancel_from_another_thread_stops_early(model):
    cancel = threading.Event()
    seen = []
    for piece in chat(model, MESSAGES, max_tokens=200, temperature=0, cancel=cancel):
        seen.append(piece)
        if len(seen) == 1:
            threading.Thread(target=cancel.set).start()
    done = _done(seen)
    greedy = _done(chat(model, MESSAGES, max_tokens=200, temperature=0))
    assert done.finish_reason == "cancelled"
    assert len(done.token_ids) < len(greedy.token_ids)
    assert done.token_ids == greedy.token_ids[:len(done.token_ids)]


def test_interleaved_conversations_keep_their_own_cache(model):
    other = [{"role": "user", "content": "Count to five."}]
    alone = [_done(chat(model, m, max_tokens=8, temperature=0)).token_ids for m in (MESSAGES, other)]
    a, b = chat(model, MESSAGES, max_tokens=8, temperature=0), chat(model, other, max_tokens=8, temperature=0)
    interleaved = [[], []]
    for pair in zip(a, b):
        for i, piece in enumerate(pair):
            interleaved[i].append(piece)
    interleaved = [_done(p + list(g)).token_ids for p, g in zip(interleaved, (a, b))]
    assert interleaved == alone


def test_a_kept_cache_prefills_only_the_new_turn_and_answers_the_same(model):
    """Turn after turn through one cache: each prefill covers only what the cache lacks, the answers equal those
    of a fresh cache, and an edited earlier message rolls the cache back to where the prompts part."""
    cache = model.new_cache()
    messages = list(MESSAGES)
    for turn in range(3):
        fresh = _done(chat(model, messages, max_tokens=6, temperature=0)).token_ids
        model.reset_stats()
        done = _done(chat(model, messages, max_tokens=6, temperature=0, cache=cache))
        prompt = len(_prompt_ids_of(model, messages))
        assert done.token_ids == fresh
        if turn:
            assert model.stats()["tokens"] < prompt // 2 + len(done.token_ids)
        messages = messages + [{"role": "assistant", "content": model.tokenizer.decode(done.token_ids)},
                               {"role": "user", "content": f"And {turn}?"}]
    edited = [MESSAGES[0], {"role": "user", "content": "Name two colours."}] + messages[2:]
    fresh = _done(chat(model, edited, max_tokens=6, temperature=0)).token_ids
    model.reset_stats()
    assert _done(chat(model, edited, max_tokens=6, temperature=0, cache=cache)).token_ids == fresh
    assert model.stats()["tokens"] > len(_prompt_ids_of(model, edited)) // 2  # most of it fed again


def _prompt_ids_of(model, messages):
    return model.tokenizer.encode(encode_messages(messages))


def _route(router, ids):
    """Feed ids until the router finishes, as the decode loop does."""
    pieces = []
    for t in ids:
        pieces += router.feed(t)
        if router.finish_reason is not None:
            break
    return pieces


def test_router_splits_reasoning_from_content(model):
    tok = model.tokenizer
    ids = tok.encode("<think>colours are hues</think>red, green") + [tok.eos_id] + tok.encode("ignored")
    router = TokenRouter(tok, think="high")
    pieces = _route(router, ids)
    assert router.finish_reason == "stop"
    kinds = {k: "".join(p.text for p in pieces if p.kind == k) for k in ("reasoning", "content")}
    assert kinds == {"reasoning": "colours are hues", "content": "red, green"}
    assert [p.kind for p in pieces] == sorted((p.kind for p in pieces), key=["reasoning", "content"].index)


def test_router_without_thinking_keeps_markup_as_content(model):
    tok = model.tokenizer
    router = TokenRouter(tok, think="none")
    pieces = _route(router, tok.encode("a</think>b") + [tok.eos_id])
    assert router.finish_reason == "stop"
    assert "".join(p.text for p in pieces) == "a</think>b" and {p.kind for p in pieces} == {"content"}


def test_router_tool_call_finishes_with_tool_calls(model):
    tok = model.tokenizer
    dsml = "｜DSML｜"
    text = (f'ok\n\n<{dsml}tool_calls>\n<{dsml}invoke name="lookup">\n<{dsml}parameter name="n" string="false">3'
            f'</{dsml}parameter>\n</{dsml}invoke>\n</{dsml}tool_calls>')
    router = TokenRouter(tok)
    pieces = _route(router, tok.encode(text) + [tok.eos_id])
    assert router.finish_reason == "tool_calls"
    assert "".join(p.text for p in pieces if p.kind == "content") == "ok"
    assert [p.tool_call for p in pieces if p.kind == "tool_call"] == [
        {"type": "function", "function": {"name": "lookup", "arguments": '{"n": 3}'}}]


def test_router_stop_string_and_length(model):
    tok = model.tokenizer
    router = TokenRouter(tok, stop=["green"])
    pieces = _route(router, tok.encode("red, green, blue"))
    assert router.finish_reason == "stop" and "".join(p.text for p in pieces) == "red, "
    router = TokenRouter(tok, max_tokens=2)
    ids = tok.encode("red, green, blue")
    text = "".join(p.text for p in _route(router, ids))
    assert router.finish_reason == "length" and text == tok.decode(ids[:2])


def test_prompt_longer_than_context_is_rejected(model):
    with pytest.raises(ValueError, match="messages"):
        chat(model, [{"role": "user", "content": "word " * 2000}])
