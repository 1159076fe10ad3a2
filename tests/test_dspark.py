"""DSpark drafts (flashlite/dspark.py) on synthetic drafts in llama.cpp's layout (tests/dspark_draft.py): the target
features are the hc means of the chosen blocks' inputs, the draft's logits and Markov-chained drafts equal a float64
numpy DSpark built from llama.cpp's graph (context rows injected from the features, a block that attends without
the causal mask, windowed), and greedy output with DSpark speculation is plain decoding's, token for token, at every
draft length, with drafts that miss and with a draft that knows the answer."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dspark_draft import NumpyDSpark, write_dspark
from flashlite import speculative as sp
from flashlite.cli import main
from flashlite.dspark import DSparkState
from flashlite.model import load
from quantized import quantized
from test_speculative import accepted_on_each

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_v4"
SMALL = ROOT / "tests" / "fixtures" / "small_v4"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dspark")
    out = {"tiny": quantized(TINY, d / "tiny-f32.gguf", "--type", "f32"), "small": quantized(SMALL, d / "small.gguf")}
    out["dspark-tiny"] = write_dspark(str(out["tiny"]), str(d / "dspark-tiny.gguf"), target_layers=[1, 4, 6])
    out["dspark-small"] = write_dspark(str(out["small"]), str(d / "dspark-small.gguf"), seed=1)
    return out


@pytest.fixture(scope="module")
def tiny(files):
    return load(files["tiny"])


def _prompt(vocab: int, n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _first_bigrams(answer: list[int]) -> dict[int, int]:
    """Each token of an answer -> the token that first follows it: what a draft that knows the answer drafts."""
    bigrams = {}
    for prev, nxt in zip(answer, answer[1:]):
        bigrams.setdefault(prev, nxt)
    return bigrams


def test_features_are_the_hc_means_of_the_blocks_inputs(tiny):
    ids = _prompt(tiny.vocab_size, 12)
    taps, dump = {1: None, 4: None, 6: None}, {}
    tiny.forward(ids, cache=tiny.new_cache(), logits="none", dump=dump, taps=taps)
    for layer in (1, 4, 6):
        assert np.array_equal(taps[layer], dump[f"blk.{layer - 1}.ffn"].mean(axis=1)), layer


@pytest.mark.parametrize("n_prompt,k", [(5, 1), (9, 7), (40, 4)])  # tiny's window is 16: 40 leaves most behind
def test_drafts_are_the_numpy_dsparks(tiny, files, n_prompt, k):
    head = tiny.draft_head(files["dspark-tiny"], "dspark")
    ref = NumpyDSpark(str(files["dspark-tiny"]), str(files["tiny"]))
    ids = _prompt(tiny.vocab_size, n_prompt + 1)
    prompt, anchor = ids[:-1], ids[-1]
    taps = {layer: None for layer in head.target_layers}
    tiny.forward(prompt, cache=tiny.new_cache(), logits="none", taps=taps)
    features = head.features(taps)
    state = DSparkState(head, "f32")
    state.observe(features[:3], 0)  # in two parts, as prefill and a round feed them
    state.observe(features[3:], 3)
    assert state.covers(n_prompt)
    logits, _ = head.block_logits(anchor, k, n_prompt, state.caches)
    drafts = head.markov(logits, anchor)
    expected_logits, expected = ref.draft(features.astype(np.float64), anchor, k)
    assert state.end == n_prompt  # the block's rows are gone again
    scale = np.abs(expected_logits).max()
    assert np.abs(logits - expected_logits).max() < 2e-5 * scale
    assert drafts == expected
    assert head.block_logits(anchor, k, n_prompt, state.caches)[0].tolist() == logits.tolist()  # nothing left over


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_greedy_generate_with_dspark_is_plain_decoding(files, name):
    m = load(files[name])
    ids = _prompt(m.vocab_size, 30, seed=5)
    plain = list(m.generate(ids, 40))
    draft = files["dspark-" + name]
    for n in (1, 3, 7):
        m.reset_stats()
        out = list(m.generate(ids, 40, spec_type=sp.SpecOptions("dspark", n, str(draft), adaptive=False)))
        assert out == plain, n
        assert m.stats()["drafted_tokens"] > 0
    # a draft whose Markov head knows the answer's bigrams (the first next token of each): its drafts pass until
    # a token with another next than its first, several tokens a pass
    knowing = write_dspark(str(files[name]), str(Path(draft).with_name(f"knowing-{name}.gguf")),
                           bigrams=_first_bigrams([ids[-1]] + plain))
    m.reset_stats()
    out = list(m.generate(ids, 40, spec_type=sp.SpecOptions("dspark", 7, knowing, adaptive=False)))
    st = m.stats()
    assert out == plain
    assert st["accepted_tokens"] > 0.25 * st["drafted_tokens"] and st["spec_rounds"] < 30, st
    m.close()


def test_chat_turns_keep_the_draft_context(files):
    """A conversation's second turn reuses the first's cache: the DSpark context follows the cache (rolled back
    to the shared prefix) and the answers are those without speculation."""
    m = load(files["small"], spec_type="dspark", model_draft=files["dspark-small"])
    assert m.speculation.type == "dspark"
    turns = [[{"role": "user", "content": "Hello! Who are you?"}]]
    cache, plain_cache = m.new_cache(), m.new_cache()
    for _ in range(2):
        spec = m.chat(turns[-1], stream=False, temperature=0, max_tokens=24, cache=cache)
        plain = m.chat(turns[-1], stream=False, temperature=0, max_tokens=24, cache=plain_cache, spec_type="none")
        assert spec[-1].token_ids == plain[-1].token_ids
        assert spec[-1].drafted_tokens > 0 and spec[-1].cached_tokens == plain[-1].cached_tokens
        turns.append(turns[-1] + [{"role": "assistant", "content": "".join(p.text for p in plain[:-1])},
                                  {"role": "user", "content": "And what can you do?"}])
    m.close()


def test_bad_drafts_are_refused_naming_the_file(files, tmp_path):
    m = load(files["small"])
    with pytest.raises(ValueError, match="DSpark draft GGUF"):
        m.spec_options("dspark")
    with pytest.raises(ValueError, match="not a DSpark draft"):
        m.spec_options("dspark", model_draft=files["small"])
    with pytest.raises(ValueError, match="another model"):
        m.spec_options("dspark", model_draft=files["dspark-tiny"])
    bad = write_dspark(str(files["small"]), str(tmp_path / "bad.gguf"), target_layers=[1, 99])
    with pytest.raises(ValueError, match="dflash.target_layers"):
        m.spec_options("dspark", model_draft=bad)
    assert m.spec_options(model_draft=files["dspark-small"]).type == "dspark"  # -md alone: the file's kind
    m.close()


def test_quantize_writes_a_dspark_checkpoints_draft(files, tmp_path):
    """`flashlite quantize --dspark` maps a DSpark checkpoint's mtp.{s}.* as llama.cpp's converter does: the stages'
    blocks as blk.{s}.* (experts stacked, bias_vl dropped), the draft's own tensors to fc, enc.output_norm,
    output_norm, output_hc_*, markov_w1/w2, conf_proj, the dflash keys; flashlite drafts with it."""
    from gguf import GGUFReader

    from dspark_draft import write_dspark_checkpoint

    values = write_dspark_checkpoint(SMALL, tmp_path / "ck")
    out = quantized(tmp_path / "ck", tmp_path / "dspark.gguf", "--dspark", "--type", "f32")
    r = GGUFReader(out)
    field = {k: f.contents() for k, f in r.fields.items()}
    assert field["general.architecture"] == "dflash" and field["dflash.block_count"] == 3
    assert field["dflash.block_size"] == 7 and field["dflash.target_layers"] == [1, 3, 6]
    assert field["tokenizer.ggml.mask_token_id"] == 1 and field["dflash.attention.compress_ratios"] == [0, 0, 0]
    assert field["dflash.hash_layer_count"] == 0 and "dflash.embedding_length_out" not in field
    t = {x.name: np.array(x.data) for x in r.tensors}
    own = {"fc.weight": "main_proj.weight", "enc.output_norm.weight": "main_norm.weight",
           "output_norm.weight": "norm.weight", "output_hc_fn.weight": "hc_head_fn",
           "markov_w1.weight": "markov_head.markov_w1.weight", "markov_w2.weight": "markov_head.markov_w2.weight",
           "conf_proj.weight": "confidence_head.proj.weight"}
    for gguf_name, release in own.items():
        assert np.array_equal(t[gguf_name], values["mtp.2." + release]), gguf_name
    for s in range(3):
        assert np.array_equal(t[f"blk.{s}.attn_q_a.weight"], values[f"mtp.{s}.attn.wq_a.weight"])
        assert np.array_equal(t[f"blk.{s}.exp_probs_b.bias"], values[f"mtp.{s}.ffn.gate.bias"])
        assert np.array_equal(t[f"blk.{s}.ffn_down_exps.weight"][5], values[f"mtp.{s}.ffn.experts.5.w2.weight"])
    assert not any(n.startswith(("token_embd", "output.")) or "bias_vl" in n for n in t)
    m = load(files["small"], spec_type="dspark", model_draft=out)
    ids = _prompt(m.vocab_size, 20, seed=9)
    plain = list(m.generate(ids, 12, spec_type="none"))
    assert list(m.generate(ids, 12)) == plain and m.stats()["drafted_tokens"] > 0
    m.close()
    result = CliRunner().invoke(main, ["quantize", str(SMALL), str(tmp_path / "x.gguf"), "--dspark", "--quiet"])
    assert result.exit_code != 0 and "dspark_target_layer_ids" in result.output


def test_dspark_on_a_torch_device_drafts_as_on_the_cpu(files):
    """With the main model on a device the DSpark stages run there (context rows in the device's logs, the target
    features taken where they are), the Markov chaining on the host: on the f32 file its block logits follow the CPU
    backend's to float32 rounding and its drafts are the CPU's; greedy speculation with a draft that knows the
    answer gives plain decoding's tokens, accepting what the CPU accepts."""
    pytest.importorskip("torch")
    on_cpu, on_dev = load(files["tiny"]), load(files["tiny"], device="torch-cpu", threads=1)
    ids = _prompt(on_cpu.vocab_size, 21)
    prompt, anchor = ids[:-1], ids[-1]
    got = {}
    for name, m in (("cpu", on_cpu), ("device", on_dev)):
        head = m.draft_head(files["dspark-tiny"], "dspark")
        taps = {layer: None for layer in head.target_layers}
        m.forward(prompt, cache=m.new_cache(), logits="none", taps=taps)
        state = DSparkState(head, "f32")
        state.observe(head.features(taps), 0)
        logits, _ = head.block_logits(anchor, 5, len(prompt), state.caches)
        assert isinstance(logits, np.ndarray) and state.end == len(prompt)
        got[name] = logits, head.markov(logits, anchor)
    delta = np.abs(got["device"][0] - got["cpu"][0]).max()
    print(f"DSpark block logits, torch-cpu against cpu: max |delta| {delta:.3g}")
    assert delta <= 1e-4 and got["device"][1] == got["cpu"][1]
    plain = list(on_dev.generate(ids, 24))
    knowing = write_dspark(str(files["tiny"]), str(Path(files["dspark-tiny"]).with_name("knowing-dev.gguf")),
                           target_layers=[1, 4, 6], bigrams=_first_bigrams([ids[-1]] + plain))
    accepted = accepted_on_each({"cpu": on_cpu, "device": on_dev}, ids, plain,
                                sp.SpecOptions("dspark", 7, knowing, adaptive=False))
    assert accepted["device"] == accepted["cpu"] > 0, accepted
