"""Speculative decoding behind `flashlite serve`, on the trained small_v4 with its MTP draft: the server's defaults
(--spec-type, --spec-draft-n-max, -md) and a request's `speculative.type` / `speculative.n_max` (llama-server's
names) change how fast a greedy answer comes, never what it says; each answer's `timings` carry llama-server's
draft_n / draft_n_accepted, and /metrics counts every drafted and accepted token."""
import http.client
import re
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from flashlite import speculative
from flashlite.cli import main
from flashlite.model import load
from quantized import quantized
from serving import serving

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "tests" / "fixtures" / "small_v4"
# the model's answer ("nis.cat is a function in the nis module. cat(map, ...") repeats itself: prompt lookup drafts
CAT = [{"role": "user", "content": "Tell me a story about a cat."}]
TOKENS = 24
# (request fields, whether the answer drafts): the server's default is the MTP draft at most 4 tokens a round
CASES = [({"speculative.type": "none"}, False), ({}, True),
         ({"speculative.type": "ngram", "speculative.n_max": 3}, None),
         ({"speculative.type": "draft-mtp", "speculative.n_max": 8}, True), ({"speculative.n_max": 1}, True)]


@pytest.fixture(scope="module", autouse=True)
def fixed_draft_length():
    """Every round drafts the request's n_max: DraftControl's choice rests on measured seconds, which on a loaded
    machine can turn drafting off and leave nothing to count (the control has its own tests in
    test_speculative.py)."""
    init = speculative.DraftControl.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speculative.DraftControl, "__init__",
                   lambda self, n_max, adaptive=True, **kw: init(self, n_max, False, **kw))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-spec")
    return {"model": quantized(SMALL, d / "small.gguf"), "mtp": quantized(SMALL, d / "mtp-small.gguf", "--mtp")}


@pytest.fixture(scope="module")
def model(files):
    """small_v4 whose default speculation is its MTP draft (`flashlite serve -m ... -md mtp-...`)."""
    return load(files["model"], spec_type="mtp", model_draft=files["mtp"])


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _metrics(server) -> dict[str, float]:
    """The speculative decoding counters of /metrics."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for name, metric in (("draft_tokens", "spec_decode_num_draft_tokens_total"),
                         ("accepted_tokens", "spec_decode_num_accepted_tokens_total"), ("rounds", "spec_rounds_total")):
        match = re.search(rf"^flashlite_{metric} (\S+)$", text, re.M)
        assert match, f"no {metric} in\n{text}"
        out[name] = float(match.group(1))
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_greedy_chat_answers_are_plain_decodings_and_the_counters_move(server, model):
    plain = model.create_chat_completion(CAT, max_tokens=TOKENS, temperature=0, spec_type="none")
    expected = plain["choices"][0]["message"]["content"]
    assert plain["usage"]["completion_tokens"] == TOKENS  # long enough for drafts to matter
    client = _client(server)
    for fields, drafts in CASES:
        before = _metrics(server)
        out = client.chat.completions.create(model="m", messages=CAT, max_tokens=TOKENS, temperature=0,
                                             extra_body=fields)
        moved = _delta(_metrics(server), before)
        assert out.choices[0].message.content == expected, fields
        timings = out.timings
        assert timings["predicted_n"] == out.usage.completion_tokens == TOKENS
        assert timings.get("draft_n", 0) == moved["draft_tokens"], fields
        assert timings.get("draft_n_accepted", 0) == moved["accepted_tokens"], fields
        if drafts is False:
            assert moved == {"draft_tokens": 0, "accepted_tokens": 0, "rounds": 0} and "draft_n" not in timings
        elif drafts:
            # the trained MTP head's drafts pass, so the answer takes fewer rounds than tokens
            assert 0 < moved["accepted_tokens"] <= moved["draft_tokens"] and moved["rounds"] < TOKENS, fields
        n_max = fields.get("speculative.n_max", 4)
        assert moved["draft_tokens"] <= n_max * moved["rounds"], fields


def test_streams_and_completions_speculate_alike(server, model):
    client = _client(server)
    plain = model.create_chat_completion(CAT, max_tokens=TOKENS, temperature=0, spec_type="none")
    before = _metrics(server)
    chunks = list(client.chat.completions.create(model="m", messages=CAT, max_tokens=TOKENS, temperature=0,
                                                 stream=True))
    moved = _delta(_metrics(server), before)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1].timings["draft_n"] == moved["draft_tokens"] > 0
    assert all(getattr(c, "timings", None) is None for c in chunks[:-1])

    prompt = "os.path.join is a function in the os.path module."
    answers = {}
    for kind in ("none", "ngram", "mtp"):
        before = _metrics(server)
        out = client.completions.create(model="m", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                        extra_body={"speculative.type": kind})
        moved = _delta(_metrics(server), before)
        answers[kind] = out.choices[0].text
        assert out.timings.get("draft_n", 0) == moved["draft_tokens"]
        if kind != "ngram":  # (prompt lookup drafts when the answer repeats what came before)
            assert (moved["draft_tokens"] > 0) == (kind == "mtp"), kind
    assert answers["ngram"] == answers["mtp"] == answers["none"]
    assert len(model.tokenizer.encode(answers["none"])) >= TOKENS - 2


@pytest.mark.parametrize("fields,param", [
    ({"speculative.type": "eagle"}, "speculative.type"),
    ({"speculative.type": 3}, "speculative.type"),
    ({"speculative.n_max": 0}, "speculative.n_max"),
    ({"speculative.n_max": 15}, "speculative.n_max"),
    ({"speculative.n_max": "4"}, "speculative.n_max"),
    ({"speculative.type": "dspark"}, "speculative.type"),  # this server's draft is an MTP draft
])
def test_bad_speculation_fields_are_400s_naming_them(server, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="m", messages=CAT, max_tokens=2, extra_body=fields)
    assert err.value.body["param"] == param
    assert param in err.value.body["message"]


def test_a_server_without_a_draft_drafts_by_lookup_only(files):
    with load(files["model"]) as plain_model, serving(plain_model) as server:
        client = _client(server)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=CAT, max_tokens=2,
                                           extra_body={"speculative.type": "mtp"})
        assert err.value.body["param"] == "speculative.type" and "-md" in err.value.body["message"]
        before = _metrics(server)
        out = client.chat.completions.create(model="m", messages=CAT, max_tokens=TOKENS, temperature=0)
        assert _delta(_metrics(server), before)["rounds"] == 0 and "draft_n" not in out.timings  # no default
        # asked again, the model says again what it said: something for prompt lookup to draft
        again = CAT + [{"role": "assistant", "content": out.choices[0].message.content}] + CAT
        client.chat.completions.create(model="m", messages=again, max_tokens=TOKENS, temperature=0,
                                       extra_body={"speculative.type": "ngram"})
        assert _delta(_metrics(server), before)["draft_tokens"] > 0


def test_serve_command_takes_llamacpps_options(files):
    result = CliRunner().invoke(main, ["serve", "-m", str(files["model"]), "--spec-type", "mtp", "--port", "0"])
    assert result.exit_code != 0 and "needs the MTP draft GGUF" in result.output
    result = CliRunner().invoke(main, ["serve", "-m", str(files["model"]), "-md", str(files["model"]),
                                       "--port", "0"])
    assert result.exit_code != 0 and "not an MTP draft GGUF" in result.output


def test_a_server_with_a_dspark_draft_drafts_with_it(files, tmp_path):
    from dspark_draft import write_dspark

    draft = write_dspark(str(files["model"]), str(tmp_path / "dspark.gguf"))
    with load(files["model"], model_draft=draft) as m, serving(m) as server:  # -md alone: the file's kind
        assert m.speculation.type == "dspark"
        client = _client(server)
        plain = m.create_chat_completion(CAT, max_tokens=TOKENS, temperature=0, spec_type="none")
        for fields in ({}, {"speculative.type": "draft-dspark", "speculative.n_max": 7}):
            before = _metrics(server)
            out = client.chat.completions.create(model="m", messages=CAT, max_tokens=TOKENS, temperature=0,
                                                 extra_body=fields)
            assert out.choices[0].message.content == plain["choices"][0]["message"]["content"]
            assert out.timings["draft_n"] == _delta(_metrics(server), before)["draft_tokens"] > 0
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=CAT, max_tokens=2,
                                           extra_body={"speculative.type": "mtp"})
        assert err.value.body["param"] == "speculative.type"
