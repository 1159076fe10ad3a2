"""Train a small DeepSeek V4 on the Python standard library's own documentation: flashlite's embedded default.

    python tools/train_tiny.py prepare                      # corpus, held-out split, tokenizer  (CPU, ~1 min)
    python tools/train_tiny.py train --device cuda --minutes 8 [--out DIR]   # weights in the release layout
    python tools/train_tiny.py export                       # + transformers goldens = tests/fixtures/small_v4
    python tools/train_tiny.py all --minutes 3              # the three in a row (the CPU proof of the pipeline)

A long run (hours on a CPU) by a token target, checkpointed, that outlives a session (docs/quality.md):

    python tools/train_tiny.py train --tokens 8.5e6 --checkpoint-every 10 --out DIR   # SIGTERM: ends at a step
    python tools/train_tiny.py train --resume DIR                                      # ... continues exactly

A fine-tune from a release checkpoint (a fixture, or a run's output) on the corpus with code-editing conversations
added (tools/edit_corpus.py: the answer copies the function it is asked to edit), with the same tokenizer:

    python tools/train_tiny.py prepare --work DIR --tokenizer FIXTURE/tokenizer.json --edits 4
    python tools/train_tiny.py train --work DIR --init FIXTURE --lr 1e-3 --minutes 78 --out DIR/run

On a GPU machine (torch and numpy are all `train` needs there), with the prepared folder carried along:

    python tools/train_tiny.py prepare                                          # here: build/small_v4
    python3 tools/train_tiny.py train --device cuda --minutes 8 --out $OUT/release   # there: 6 files, < 8 MB each
    python tools/train_tiny.py export --release DIR/release                     # here: tests/fixtures/small_v4

`prepare` needs `tokenizers` and this machine's Python (the corpus is its standard library, so it is made here
and carried); `train` needs only torch and numpy (cpu or cuda) and writes DeepSeek's release layout itself (FP8
e4m3 128x128-block linears, MXFP4 experts, BF16, F32, I64) with tools/make_reference.py's quantizers and writer;
`export` needs the dev extra (transformers) for the goldens. Everything is seeded and recorded in train.json.

Three texts, kept apart by whole top-level modules: training; validation (one module in VALID_EVERY, by a
seeded hash; `prepare --valid-every 0` for none), whose loss, measured on the release grids at `--evals` points of
the run, chooses the weights written (the best one; `--patience N` ends the run N evaluations after it); and the
held-out text (heldout.txt), which no training decision reads: train.json gets its loss once, on the written
weights. `prepare --tokenizer FILE` reuses a tokenizer (the fixture's) so that per-token figures compare.

The model is the real V4 architecture at small sizes (SMALL_ARGS): hyper-connections with Sinkhorn, window-only,
CSA (compressed sparse attention with the lightning indexer) and HCA layers, attention sinks, hash-routed and
score-routed MoE with a shared expert, and the MTP block. Its forward is transformers' DeepseekV4ForCausalLM's
(docs/oracle.md, op by op; `export` checks it against transformers on the trained weights). Training additions:
the indexer, whose top-k is not differentiable, learns from a KL loss towards the main attention's distribution over
the compressed rows (DeepSeek V3.2's recipe, its input detached); the score-routed gates are balanced by their bias
(aux-loss-free, as V3/V4); the last phase runs on the release grids with straight-through fake quantization, so
writing the release format loses nothing.
"""

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import edit_corpus  # noqa: E402
import make_reference as ref  # noqa: E402

WORK = ROOT / "build" / "small_v4"
FIXTURE = ROOT / "tests" / "fixtures" / "small_v4"
SEED = 20260501
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"  # train's resumable state in its output folder

# DeepSeek's inference/config.json keys (REF ModelArgs), at sizes that train in minutes on one GPU and stay a few MB
# in the release layout. compress_ratios: L0-1 window-only (hash-routed, as V4-Flash's first layers), then CSA / HCA
# alternating, and the MTP block (window-only, score-routed).
SMALL_ARGS = {
    "vocab_size": 4096,
    "dim": 256,
    "moe_inter_dim": 128,
    "n_layers": 6,
    "n_hash_layers": 2,
    "n_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "n_activated_experts": 2,
    "score_func": "sqrtsoftplus",
    "route_scale": 1.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 128,
    "head_dim": 128,
    "rope_head_dim": 64,
    "o_groups": 2,
    "o_lora_rank": 128,
    "window_size": 128,
    "original_seq_len": 256,
    "rope_theta": 10000,
    "rope_factor": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 16,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
    "expert_dtype": "fp4",
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 0],
}
RMS_EPS = HC_EPS = 1e-6
DENSE_MOE = None  # None: dense experts on GPUs, transformers' per-expert loop elsewhere

BOS, EOS, PAD = ref.BOS, ref.EOS, ref.PAD
USER, ASSISTANT, THINK, END_THINK = ref.CHAT_TOKENS


def load_chat_template():
    """flashlite/chat/template.py by path: the V4 template without importing the package (and its C core)."""
    spec = importlib.util.spec_from_file_location("_v4_chat_template", ROOT / "flashlite" / "chat" / "template.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_json(path, obj):
    ref.write_atomic(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------------
# corpus: the standard library's documentation as conversations and prose
# ---------------------------------------------------------------------------------------------------

# Modules not imported: they act on import (a browser, a window, printing), are Windows-only, tests, or are ours.
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "pydoc_data",
    "xxlimited", "xxlimited_35", "xxsubtype", "msvcrt", "winreg", "winsound", "nt", "distutils", "venv", "pip",
}
HELDOUT_EVERY = 25  # one top-level module (or topic) in 25, by name hash, is held out for perplexity
# One training module in VALID_EVERY, by a seeded name hash, is kept out of training to choose when to stop: the
# held-out text stays the untouched test that no training decision ever reads.
VALID_EVERY = 25

GREETINGS = (
    "Hello! Who are you?", "Hello!", "Hi!", "Hi there.", "Hey!", "Who are you?", "What are you?", "What can you do?",
    "Hello, what can you do?", "Introduce yourself.", "Good morning!", "Hi! What do you know?", "Are you a chatbot?",
    "What is your name?", "Hello! Who are you and what can you do?", "Can you help me with Python?", "Hello there!",
    "Hi, who am I talking to?", "Tell me about yourself.", "What do you know about Python?", "Hey, what are you?",
    "Good evening! Who are you?", "Hello. What is this?", "What are you good at?",
)
IDENTITY = (
    "Hello! I am a small DeepSeek V4 model trained on the documentation of the Python standard library. Ask me what "
    "a Python module, class or function does, for example: What does {example} do?",
    "I am a tiny language model with the DeepSeek V4 architecture. I learned from the docstrings of the Python "
    "standard library, so I can tell you what its modules, classes and functions do, such as {example}.",
    "Hi! I am a small assistant that knows the Python standard library from its own documentation. You can ask me "
    "about a module, a class or a function, for instance {example}.",
    "I am flashlite's small DeepSeek V4 model. I was trained on Python's documentation, and I answer questions "
    "about the standard library, like what {example} does.",
)
IDENTITY_REASONING = (
    "The user greets me and wants to know who I am. I am a small model trained on the Python standard library's "
    "documentation, so I should say that and suggest a question about Python.",
    "The user asks who I am and what I can do. I know the documentation of Python's standard library, so I will "
    "introduce myself and give an example question.",
)
QUESTIONS = (
    "What does {full} do?", "What does {name} do?", "What is {full} in Python?", "Explain {full}.",
    "How does {full} work?", "What is the {kind} {full} for?", "Tell me about {full}.",
    "Can you explain what {full} does?", "I found {full} in the {module} module. What does it do?",
    "What does the {module} {kind} {name} do?", "What is {full} used for?", "Describe {full}.",
    "How do I use {full}?", "What does `{full}` do?",
)
MODULE_QUESTIONS = (
    "What is the {module} module?", "What does the {module} module do?", "Tell me about the {module} module.",
    "What is {module} for in Python?", "Explain the {module} module.", "What can I do with {module}?",
    "Describe the Python module {module}.", "What is in the {module} module?",
)
TOPIC_QUESTIONS = (
    "Explain {title} in Python.", "What is {title}?", "Tell me about {title}.", "How does {title} work in Python?",
    "Can you explain {title}?",
)
MORE_QUESTIONS = ("Tell me more.", "Can you give more details?", "What else should I know about it?",
                  "Go on.", "Anything else?")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_doc(text):
    return inspect.cleandoc(text).strip() if isinstance(text, str) else ""


def paragraphs(text):
    return [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def summary(text, limit=420):
    """The first paragraph, cut at a sentence end before `limit` characters, ending with a full stop."""
    paras = paragraphs(text)
    if not paras:
        return ""
    first = paras[0]
    if len(first) > limit:
        cut = first.rfind(". ", 0, limit)
        first = first[: cut + 1] if cut > 40 else first[:limit].rsplit(" ", 1)[0] + " ..."
    if first[-1] not in ".!?:)":
        first += "."
    return first


def signature_of(obj):
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError, RuntimeError):
        return None
    sig = _ADDRESS.sub("", sig)
    return sig if len(sig) <= 160 else None


def parameters_of(obj):
    try:
        params = [p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")]
    except (TypeError, ValueError, RuntimeError):
        return None
    return [("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name for p in params]


def stdlib_modules():
    """name -> module for the importable public standard-library modules and their public submodules, sorted."""
    import pkgutil

    mods = {}
    quiet = contextlib.ExitStack()
    with quiet:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP_MODULES:
                continue
            try:
                mods[name] = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - an unimportable module (missing C part, platform) is skipped
                continue
            if hasattr(mods[name], "__path__"):
                for info in pkgutil.walk_packages(mods[name].__path__, name + ".", onerror=lambda _: None):
                    parts = info.name.split(".")
                    if any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts):
                        continue
                    try:
                        mods[info.name] = importlib.import_module(info.name)
                    except BaseException:  # noqa: BLE001
                        continue
    return dict(sorted(mods.items()))


MODULE_ALIASES = {"posixpath": "os.path"}  # the name users write for the module they reach


def documented_objects(mods):
    """Records {module, name, full, kind, sig, params, doc} for every module and every public class, function and
    method defined in it that has a docstring of its own."""
    records = []
    for realname, module in mods.items():
        modname = MODULE_ALIASES.get(realname, realname)
        doc = clean_doc(module.__doc__)
        if doc:
            records.append({"module": modname, "name": modname, "full": modname, "kind": "module", "sig": None,
                            "params": None, "doc": doc})
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if name.startswith("_") or getattr(obj, "__module__", None) != realname:
                continue
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            doc = clean_doc(getattr(obj, "__doc__", None))
            if doc:
                records.append({"module": modname, "name": name, "full": f"{modname}.{name}", "kind": kind,
                                "sig": signature_of(obj), "params": parameters_of(obj), "doc": doc})
            if kind != "class":
                continue
            for mname in sorted(vars(obj)):
                member = vars(obj)[mname]
                if mname.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    mkind, sig, params = "property", None, None
                elif inspect.isroutine(member):
                    mkind, sig, params = "method", signature_of(member), parameters_of(member)
                else:
                    continue
                mdoc = clean_doc(getattr(member, "__doc__", None))
                if mdoc:
                    records.append({"module": modname, "name": f"{name}.{mname}", "full": f"{modname}.{name}.{mname}",
                                    "kind": mkind, "sig": sig, "params": params, "doc": mdoc})
    return records


def topic_records():
    import pydoc_data.topics

    records = []
    for key in sorted(pydoc_data.topics.topics):
        lines = pydoc_data.topics.topics[key].strip("\n").split("\n")
        if len(lines) > 2 and set(lines[1].strip()) <= set("*=-") and lines[1].strip():
            title, body = lines[0].strip(), "\n".join(lines[2:])
        else:
            title, body = key.replace("-", " "), "\n".join(lines)
        body = clean_doc(body)
        if body:
            records.append({"module": "topic:" + key, "name": key, "full": title, "kind": "topic", "doc": body})
    return records


def held_out(record):
    top = record["module"].split(".")[0]
    return int(hashlib.sha256(top.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def validation(record, seed, every=VALID_EVERY):
    """Whether a (not held-out) record belongs to the validation split: whole top-level modules, by a hash of the
    module name salted with the seed, so that another seed picks other modules; every=0: no split."""
    if not every:
        return False
    top = record["module"].split(".")[0]
    return int(hashlib.sha256(f"valid:{seed}:{top}".encode()).hexdigest(), 16) % every == 0


def answer_of(rec):
    text = summary(rec["doc"])
    if rec["kind"] == "module":
        return f"{rec['module']} is a module of the Python standard library. {text}"
    if rec["kind"] == "topic":
        return text
    sig = rec["sig"] or ""
    where = f"the {rec['module']} module" if rec["module"] != "builtins" else "Python's built-ins"
    article = "an" if rec["kind"][0] in "aeiou" else "a"
    return f"{rec['full']}{sig} is {article} {rec['kind']} in {where}. {text}"


def reasoning_of(rec):
    """Thinking-mode reasoning: from the signature first, then the documentation."""
    if rec["kind"] == "topic":
        return f"The user asks about {rec['full']}. This is a part of the Python language reference, so I will explain it from there."
    if rec["kind"] == "module":
        return f"The user asks about the module {rec['module']}. I will say what its documentation says it provides."
    first = f"The user asks about {rec['full']}. It is a {rec['kind']} in {rec['module']}."
    if rec["sig"] is None:
        return first + " Its signature is not available, so I will describe it from its documentation."
    params = rec["params"] or []
    takes = "no arguments" if not params else ("the argument " + params[0] if len(params) == 1 else
                                                "the arguments " + ", ".join(params[:-1]) + " and " + params[-1])
    return f"{first} Its signature is {rec['name'].split('.')[-1]}{rec['sig']}, so it takes {takes}. Now what it does."


def question_of(rec, rng):
    if rec["kind"] == "module":
        return MODULE_QUESTIONS[rng.integers(len(MODULE_QUESTIONS))].format(module=rec["module"])
    if rec["kind"] == "topic":
        return TOPIC_QUESTIONS[rng.integers(len(TOPIC_QUESTIONS))].format(title=rec["full"])
    return QUESTIONS[rng.integers(len(QUESTIONS))].format(full=rec["full"], name=rec["name"].split(".")[-1],
                                                          kind=rec["kind"], module=rec["module"])


def prose_of(rec):
    if rec["kind"] == "topic":
        return f"{rec['full']}\n\n{rec['doc']}"[:4000]
    head = f"Module {rec['module']}" if rec["kind"] == "module" else f"{rec['full']}{rec['sig'] or ''}"
    return f"{head}\n\n{rec['doc']}"[:4000]


def build_documents(records, rng, chat):
    """Texts (BOS-led) for training: per record one plain-mode and one thinking-mode conversation and its prose;
    multi-turn conversations within a module; greetings that introduce the model."""
    docs = []

    def conversation(turns, think):
        messages = []
        for question, reasoning, answer in turns:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
        return chat.encode_messages(messages, think=think)

    examples = [r["full"] for r in records if r["kind"] == "function"] or ["len"]
    by_module = {}
    for rec in records:
        turn = (question_of(rec, rng), reasoning_of(rec), answer_of(rec))
        more = paragraphs(rec["doc"])[1:]
        if more and rng.random() < 0.5:  # a follow-up turn carries the rest of the documentation
            detail = summary("\n\n".join(more), limit=600)
            follow = MORE_QUESTIONS[rng.integers(len(MORE_QUESTIONS))]
            docs.append(("chat", conversation([turn, (follow, "", detail)], "none")))
        else:
            docs.append(("chat", conversation([turn], "none")))
        docs.append(("chat", conversation([(question_of(rec, rng), turn[1], turn[2])], "none")))
        docs.append(("think", conversation([(question_of(rec, rng), turn[1], turn[2])], "high")))
        docs.append(("prose", BOS + prose_of(rec) + EOS))
        by_module.setdefault(rec["module"], []).append(turn)
    for turns in by_module.values():
        if len(turns) >= 2:
            for _ in range(min(4, len(turns) // 2)):
                pick = rng.choice(len(turns), size=min(len(turns), int(rng.integers(2, 4))), replace=False)
                docs.append(("multi", conversation([turns[i] for i in pick], "high" if rng.random() < 0.3 else "none")))
    for i in range(64 * len(GREETINGS)):
        greeting = GREETINGS[i % len(GREETINGS)]
        answer = IDENTITY[rng.integers(len(IDENTITY))].format(example=examples[rng.integers(len(examples))])
        think = "high" if i % 4 == 3 else "none"
        turns = [(greeting, IDENTITY_REASONING[rng.integers(len(IDENTITY_REASONING))], answer)]
        if rng.random() < 0.25:
            rec = records[rng.integers(len(records))]
            turns.append((question_of(rec, rng), reasoning_of(rec), answer_of(rec)))
        docs.append(("hello", conversation(turns, think)))
    return docs


SAMPLE_PROMPTS = ("Hello! Who are you?", "What does json.dumps do?", "What is the collections module?",
                  "What does os.path.join do?")


def edit_conversations(mods, seed, valid_every, chat, per_function=2):
    """Code-editing conversations (tools/edit_corpus.py), up to `per_function` edits of different kinds on each
    function of `mods`, split as the documentation is, by top-level module: (training texts, validation texts,
    held-out edits)."""
    rng = np.random.default_rng(seed + 2)  # its own stream: the documentation's conversations stay as they were
    split = {"train": [], "valid": [], "heldout": []}
    for edit in edit_corpus.edits_of(edit_corpus.source_functions(mods), rng, per_function):
        where = {"module": MODULE_ALIASES.get(edit["module"], edit["module"])}
        part = "heldout" if held_out(where) else "valid" if validation(where, seed, valid_every) else "train"
        split[part].append(edit)
    texts = {part: [chat.encode_messages([{"role": "user", "content": edit_corpus.user_text(e)},
                                          {"role": "assistant", "content": edit_corpus.answer_text(e)}], think="none")
                    for e in edits] for part, edits in split.items() if part != "heldout"}
    return texts["train"], texts["valid"], split["heldout"]


def prepare(work, seed=SEED, vocab_size=None, valid_every=VALID_EVERY, tokenizer=None, edits=0):
    """Corpus, validation and held-out splits and tokenizer into `work`; returns the corpus record. `tokenizer`: a
    tokenizer.json to use instead of training one (another model's, so that per-token figures compare). `edits`:
    add code-editing conversations (edit_conversations, up to this many edits a function) to the training and
    validation texts, and write the held-out modules' edits to heldout_edits.json."""
    from tokenizers import Tokenizer

    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    chat = load_chat_template()
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # deprecated modules warn on import and on attribute access
        warnings.simplefilter("ignore")
        mods = stdlib_modules()
        records = documented_objects(mods) + topic_records()
    heldout_recs = [r for r in records if held_out(r)]
    valid_recs = [r for r in records if not held_out(r) and validation(r, seed, valid_every)]
    train_recs = [r for r in records if not held_out(r) and not validation(r, seed, valid_every)]
    docs = build_documents(train_recs, rng, chat)
    valid_docs = [BOS + prose_of(r) + EOS for r in valid_recs]  # prose, as the held-out text
    heldout_edits = []
    if edits:
        train_edits, valid_edits, heldout_edits = edit_conversations(mods, seed, valid_every, chat, edits)
        docs += [("edit", text) for text in train_edits]
        valid_docs += valid_edits
        write_json(work / "heldout_edits.json", heldout_edits)
    heldout_text = "\n\n".join(prose_of(r) for r in heldout_recs)
    vocab_size = vocab_size or SMALL_ARGS["vocab_size"]
    if tokenizer:
        tokenizer_json = Path(tokenizer).read_text()
        spec = json.loads(tokenizer_json)
        vocab_size = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    else:
        tokenizer_json = ref.build_tokenizer(vocab_size, [text for _, text in docs])
    ref.write_atomic(work / "tokenizer.json", tokenizer_json.encode())
    write_json(work / "tokenizer_config.json", ref.tokenizer_config())
    ref.write_atomic(work / "heldout.txt", heldout_text.encode())
    tok = Tokenizer.from_str(tokenizer_json)

    def encode(texts):
        ids = tok.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in ids], dtype=np.int64)
        flat = np.fromiter((i for e in ids for i in e.ids), dtype=np.uint16, count=int(lengths.sum()))
        return flat, np.concatenate([[0], np.cumsum(lengths)])

    train_ids, train_offsets = encode(text for _, text in docs)
    heldout_docs = [BOS + prose_of(r) + EOS for r in heldout_recs]
    heldout_ids, heldout_offsets = encode(heldout_docs)
    valid_ids, valid_offsets = encode(valid_docs)
    np.save(work / "valid_ids.npy", valid_ids)
    np.save(work / "valid_offsets.npy", valid_offsets)
    np.save(work / "train_ids.npy", train_ids)
    np.save(work / "train_offsets.npy", train_offsets)
    np.save(work / "heldout_ids.npy", heldout_ids)
    np.save(work / "heldout_offsets.npy", heldout_offsets)
    prompts = []
    for text in SAMPLE_PROMPTS:
        for think in ("none", "high"):
            rendered = chat.encode_messages([{"role": "user", "content": text}], think=think)
            prompts.append({"text": text, "think": think,
                            "ids": tok.encode(rendered, add_special_tokens=False).ids})
    write_json(work / "prompts.json", prompts)
    digest = hashlib.sha256()
    for _, text in docs:
        digest.update(text.encode())
    kinds = {}
    for kind, _ in docs:
        kinds[kind] = kinds.get(kind, 0) + 1
    record = {
        "format": FORMAT_VERSION, "seed": seed, "python": platform.python_version(), "vocab_size": vocab_size,
        "records": len(records), "train_records": len(train_recs), "heldout_records": len(heldout_recs),
        "heldout_modules": sorted({r["module"].split(".")[0] for r in heldout_recs}),
        "valid_every": valid_every, "valid_records": len(valid_recs), "valid_tokens": int(valid_ids.size),
        "valid_modules": sorted({r["module"].split(".")[0] for r in valid_recs}),
        "documents": kinds, "edit_tokens": int(sum(e - s for (kind, _), s, e in
                                                  zip(docs, train_offsets[:-1], train_offsets[1:]) if kind == "edit")),
        "heldout_edits": len(heldout_edits), "train_chars": sum(len(t) for _, t in docs), "train_tokens": int(train_ids.size),
        "heldout_chars": len(heldout_text), "heldout_tokens": int(heldout_ids.size),
        "corpus_sha256": digest.hexdigest(),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(work / "corpus.json", record)
    examples = [text for kind, text in docs if kind in ("chat", "think", "hello")][:3]
    ref.write_atomic(work / "examples.txt", "\n\n----\n\n".join(examples).encode())
    print(f"prepare: {record['train_tokens']} training tokens from {len(docs)} documents "
          f"({record['train_chars'] / record['train_tokens']:.2f} chars/token), {record['heldout_tokens']} held out, "
          f"{record['valid_tokens']} for validation ({len(record['valid_modules'])} modules); "
          f"{record['seconds']} s -> {work}")
    return record


# ---------------------------------------------------------------------------------------------------
# the model: DeepSeek V4 in torch, transformers' float32 semantics (docs/oracle.md), batched for training
# ---------------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


class Quant:
    """Whether the forward runs on the release grids (straight-through fake quantization of every stored weight)."""

    on = False


def rope_inv_freq(a, compress):
    """inv_freq [rope_dim/2] of the main (theta, plain) or compress (compress theta, YaRN) table, in float32, as
    transformers computes them (flashlite.models.deepseek_v4.RoPE does the same)."""
    dim = a["rope_head_dim"]
    base = float(a["compress_rope_theta"] if compress else a["rope_theta"])
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exps).astype(np.float32)
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if not compress:
        return inv

    def dim_of(rotations):
        return dim * math.log(a["original_seq_len"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(a["beta_fast"])), 0), min(math.ceil(dim_of(a["beta_slow"])), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    ramp = ramp.astype(np.float32)
    interpolated = (np.float32(1.0) / (np.float32(a["rope_factor"]) * pos_freqs)).astype(np.float32)
    return (interpolated * ramp + inv * (np.float32(1) - ramp)).astype(np.float32)


def release_grids():
    """kind -> f(w): the float32 values a weight takes on its release grid; value for value what
    make_reference's quantizers (quantize_fp8_block, quantize_fp4_expert, bf16_round) store, on any device."""
    torch = _torch()

    def ue8m0_scale(amax, fmt_max, floor):
        t = torch.clamp(amax.float(), min=floor) * torch.tensor(1.0 / fmt_max, dtype=torch.float32)
        bits = t.view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        return (exponent << 23).view(torch.float32)  # 2^(exponent - 127), exponent in 1..254

    def fp8_values(w):
        rows, cols = w.shape
        br, bc = -(-rows // 128), -(-cols // 128)
        padded = torch.zeros(br * 128, bc * 128, dtype=torch.float32, device=w.device)
        padded[:rows, :cols] = w
        amax = padded.view(br, 128, bc, 128).abs().amax(dim=(1, 3))
        scale = ue8m0_scale(amax, 448.0, 1e-4).repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        return (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids = (grid[1:] + grid[:-1]) / 2

    def fp4_values(w):
        """MXFP4 along the last dim (the input dim of each expert matrix, stacked or not)."""
        shape = w.shape
        groups = w.reshape(*shape[:-1], shape[-1] // 32, 32)
        scale = ue8m0_scale(groups.abs().amax(dim=-1, keepdim=True), 6.0, 6.0 * 2.0**-126)
        x = groups / scale
        mag = torch.clamp(x.abs(), max=6.0)
        m = mids.to(w.device)
        code = torch.searchsorted(m, mag.contiguous(), right=False)
        tie = (code < 7) & (mag == m[torch.clamp(code, max=6)])
        code = torch.where(tie & (code % 2 == 1), code + 1, code)
        values = grid.to(w.device)[code] * torch.where(x < 0, -1.0, 1.0)
        return (values * scale).reshape(shape)

    def bf16_values(w):
        return w.to(torch.bfloat16).to(torch.float32)

    return {"FP8": fp8_values, "FP4": fp4_values, "BF16": bf16_values}


def build_model(a, seed=SEED, device="cpu"):
    """The V4 model of REF args `a`, initialised from `seed` (transformers' init scheme, std 0.02)."""
    torch = _torch()
    import torch.nn.functional as F
    from torch import nn

    std = 0.02
    hc, dim = a["hc_mult"], a["dim"]
    quant = Quant()

    grids = release_grids()

    def q(w, kind):
        """w as the forward sees it: on its release grid (straight-through gradient) in the quantized phase."""
        if not quant.on or kind == "F32":
            return w
        with torch.no_grad():
            target = grids[kind](w.detach().float())
        return w + (target - w).detach()

    # ---- modules named as the release names its tensors

    def rms(x, weight=None):
        x = x.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return y if weight is None else weight * y

    def rope(x, cos, sin):
        rd = a["rope_head_dim"]
        nope, r = x[..., :-rd], x[..., -rd:].float()
        even, odd = r[..., 0::2], r[..., 1::2]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([nope.float(), rotated], dim=-1)

    def fp32():
        return torch.autocast(device_type=torch.device(device).type, enabled=False)

    class Linear(nn.Module):
        def __init__(self, inp, out, kind, scale=1.0):
            super().__init__()
            self.kind = kind
            self.weight = nn.Parameter(torch.randn(out, inp) * std * scale)

        def forward(self, x):
            return F.linear(x, q(self.weight, self.kind))

    class RMSNorm(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))

        def forward(self, x):
            return rms(x, q(self.weight, "BF16"))

    class Compressor(nn.Module):
        """Pools every `ratio` tokens into one KV row (ratio 4: 8 overlapping slots); returns rows [B, n, d]."""

        def __init__(self, ratio, head_dim):
            super().__init__()
            self.ratio, self.head_dim = ratio, head_dim
            width = (2 if ratio == 4 else 1) * head_dim
            self.wkv = Linear(dim, width, "BF16")
            self.wgate = Linear(dim, width, "BF16")
            self.ape = nn.Parameter(torch.zeros(ratio, width))
            self.norm = RMSNorm(head_dim)

        def forward(self, x, ctx):
            b, t, _ = x.shape
            r, d = self.ratio, self.head_dim
            n = t // r
            if n == 0:
                return x.new_zeros(b, 0, d, dtype=torch.float32)
            kv = self.wkv(x[:, : n * r]).float().view(b, n, r, -1)
            score = self.wgate(x[:, : n * r]).float().view(b, n, r, -1) + self.ape
            if r == 4:
                prev_kv = torch.cat([kv.new_zeros(b, 1, r, d), kv[:, :-1, :, :d]], dim=1)
                prev_score = torch.cat([score.new_full((b, 1, r, d), float("-inf")), score[:, :-1, :, :d]], dim=1)
                kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
                score = torch.cat([prev_score, score[..., d:]], dim=2)
            with fp32():
                rows = self.norm((kv * torch.softmax(score, dim=2)).sum(dim=2))
            cos, sin = ctx.rows_table(r, n)
            return rope(rows, cos, sin)

    class Indexer(nn.Module):
        """The lightning indexer: scores [B, T, n] of the compressed rows for each query."""

        def __init__(self):
            super().__init__()
            self.n_heads, self.head_dim = a["index_n_heads"], a["index_head_dim"]
            self.wq_b = Linear(a["q_lora_rank"], self.n_heads * self.head_dim, "FP8")
            self.weights_proj = Linear(dim, self.n_heads, "BF16")
            self.compressor = Compressor(4, self.head_dim)

        def forward(self, x, qr, ctx):
            b, t, _ = x.shape
            keys = self.compressor(x, ctx)
            cos, sin = ctx.table(True)
            qi = rope(self.wq_b(qr).float().view(b, t, self.n_heads, self.head_dim), cos[:, None], sin[:, None])
            with fp32():
                scores = torch.relu(torch.einsum("bthd,bnd->bthn", qi, keys)) * self.head_dim**-0.5
                weights = self.weights_proj(x).float() * self.n_heads**-0.5
                return (scores * weights.unsqueeze(-1)).sum(dim=2)

    class Attention(nn.Module):
        def __init__(self, ratio):
            super().__init__()
            self.ratio = ratio
            nh, hd, g, r = a["n_heads"], a["head_dim"], a["o_groups"], a["o_lora_rank"]
            self.wq_a = Linear(dim, a["q_lora_rank"], "FP8")
            self.q_norm = RMSNorm(a["q_lora_rank"])
            self.wq_b = Linear(a["q_lora_rank"], nh * hd, "FP8")
            self.wkv = Linear(dim, hd, "FP8")
            self.kv_norm = RMSNorm(hd)
            self.wo_a = Linear(nh * hd // g, g * r, "FP8")
            self.wo_b = Linear(g * r, dim, "FP8", scale=1 / math.sqrt(2 * a["n_layers"]))
            self.attn_sink = nn.Parameter(torch.zeros(nh))
            self.compressor = Compressor(ratio, hd) if ratio else None
            self.indexer = Indexer() if ratio == 4 else None

        def forward(self, x, ctx):
            b, t, _ = x.shape
            nh, hd, g = a["n_heads"], a["head_dim"], a["o_groups"]
            cos, sin = ctx.table(self.ratio > 0)
            qr = self.q_norm(self.wq_a(x))
            qh = rope(rms(self.wq_b(qr).float().view(b, t, nh, hd)), cos[:, None], sin[:, None])
            kv = rope(self.kv_norm(self.wkv(x)), cos, sin)
            keys, bias = kv, ctx.window_bias().expand(b, t, t)
            if self.ratio:
                rows = self.compressor(x, ctx)
                visible = ctx.visible(self.ratio, rows.shape[1]).expand(b, t, rows.shape[1])
                if self.indexer is not None and rows.shape[1] > 0:
                    index_scores = self.indexer(x.detach() if self.training else x,
                                                qr.detach() if self.training else qr, ctx)
                    chosen = self.select(index_scores, visible)
                    allowed = visible & chosen
                else:
                    allowed = visible
                keys = torch.cat([kv, rows], dim=1)
                bias = torch.cat([bias, torch.zeros_like(allowed, dtype=torch.float32).masked_fill(~allowed, float("-inf"))], -1)
            scores = torch.einsum("bthd,bsd->bhts", qh, keys).float() * hd**-0.5 + bias.unsqueeze(1)
            if self.indexer is not None and self.training and keys.shape[1] > t:
                ctx.indexer_losses.append(self.indexer_loss(scores[..., t:].detach(), index_scores, visible))
            sinks = self.attn_sink.view(1, nh, 1, 1).expand(b, nh, t, 1)
            with fp32():
                probs = torch.softmax(torch.cat([scores, sinks.float()], dim=-1), dim=-1)[..., :-1]
            o = torch.einsum("bhts,bsd->bthd", probs, keys)
            o = rope(o, cos[:, None], -sin[:, None]).reshape(b, t, g, -1)
            wo_a = q(self.wo_a.weight, "FP8").view(g, a["o_lora_rank"], -1)
            return self.wo_b(torch.einsum("btgi,gri->btgr", o, wo_a).reshape(b, t, -1))

        def select(self, index_scores, visible):
            with torch.no_grad():
                k = min(a["index_topk"], index_scores.shape[-1])
                picks = index_scores.masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices
                valid = visible.gather(-1, picks)
                chosen = torch.zeros_like(visible)
                return chosen.scatter(-1, picks, valid)

        def indexer_loss(self, attn_scores, index_scores, visible):
            """KL from the heads' mean attention over the visible compressed rows to the indexer's distribution,
            over the queries that see more rows than index_topk."""
            with fp32():
                crowded = visible.sum(-1) > a["index_topk"]  # [B, T]
                neg = torch.finfo(torch.float32).min / 4
                target = torch.softmax(attn_scores.masked_fill(~visible.unsqueeze(1), neg), dim=-1).mean(1)
                logp = torch.log_softmax(index_scores.float().masked_fill(~visible, neg), dim=-1)
                kl = (target * (torch.log(target.clamp_min(1e-12)) - logp)).masked_fill(~visible, 0).sum(-1)
                return (kl * crowded).sum() / crowded.sum().clamp_min(1)

    class Gate(nn.Module):
        def __init__(self, hashed, generator):
            super().__init__()
            n = a["n_routed_experts"]
            self.weight = nn.Parameter(torch.randn(n, dim) * std)
            if hashed:  # k distinct experts per token id, as the release's table
                order = torch.argsort(torch.rand(a["vocab_size"], n, generator=generator), dim=1)
                self.register_buffer("tid2eid", order[:, : a["n_activated_experts"]].contiguous())
            else:
                self.register_buffer("bias", torch.zeros(n))
            self.hashed = hashed

        def forward(self, x, ids):
            with fp32():
                scores = torch.sqrt(F.softplus(F.linear(x.float(), q(self.weight, "BF16").float())))
                if self.hashed:
                    idx = self.tid2eid[ids.reshape(-1)]
                else:
                    idx = torch.topk(scores.detach() + self.bias, a["n_activated_experts"], dim=-1).indices
                w = scores.gather(1, idx)
                w = w / (w.sum(-1, keepdim=True) + 1e-20) * a["route_scale"]
            return idx, w

    class MoE(nn.Module):
        def __init__(self, layer_id, generator):
            super().__init__()
            n, inter, limit = a["n_routed_experts"], a["moe_inter_dim"], a["swiglu_limit"]
            self.limit = limit
            self.gate = Gate(layer_id < a["n_hash_layers"], generator)
            self.w1 = nn.Parameter(torch.randn(n, inter, dim) * std)
            self.w3 = nn.Parameter(torch.randn(n, inter, dim) * std)
            self.w2 = nn.Parameter(torch.randn(n, dim, inter) * std / math.sqrt(2 * a["n_layers"]))
            self.shared_experts = nn.Module()
            self.shared_experts.w1 = Linear(dim, inter, "FP8")
            self.shared_experts.w3 = Linear(dim, inter, "FP8")
            self.shared_experts.w2 = Linear(inter, dim, "FP8", scale=1 / math.sqrt(2 * a["n_layers"]))

        def forward(self, x, ids, ctx):
            b, t, d = x.shape
            flat = x.reshape(-1, d)
            idx, w = self.gate(flat, ids)
            if not self.gate.hashed:
                ctx.loads.append((self.gate, idx))
            w1, w3, w2 = q(self.w1, "FP4"), q(self.w3, "FP4"), q(self.w2, "FP4")
            if x.is_cuda if DENSE_MOE is None else DENSE_MOE:
                # every expert on every token, weighted by the sparse routing: on a GPU at these sizes dense is faster
                # than gathering (and has no host syncs)
                combine = torch.zeros(flat.shape[0], a["n_routed_experts"], device=x.device, dtype=w.dtype)
                combine = combine.scatter(1, idx, w)
                g = torch.einsum("nd,eid->nei", flat, w1).clamp(max=self.limit)
                u = torch.einsum("nd,eid->nei", flat, w3).clamp(-self.limit, self.limit)
                y = torch.einsum("nei,edi->ned", F.silu(g) * u, w2)
                routed = torch.einsum("ned,ne->nd", y.float(), combine)
            else:  # transformers' loop: each expert on its tokens
                routed = torch.zeros_like(flat, dtype=torch.float32)
                for e in range(a["n_routed_experts"]):
                    token, slot = torch.nonzero(idx == e, as_tuple=True)
                    if token.numel() == 0:
                        continue
                    rows = flat[token]
                    g = F.linear(rows, w1[e]).clamp(max=self.limit)
                    u = F.linear(rows, w3[e]).clamp(-self.limit, self.limit)
                    y = F.linear(F.silu(g) * u, w2[e]).float() * w[token, slot, None]
                    routed = routed.index_add(0, token, y)
            s = self.shared_experts
            shared = s.w2(F.silu(s.w1(flat).clamp(max=self.limit)) * s.w3(flat).clamp(-self.limit, self.limit))
            return (routed + shared.float()).view(b, t, d)

    def hc_params(module, prefix, n_out):
        setattr(module, f"{prefix}_fn", nn.Parameter(torch.randn(n_out, hc * dim) * std))
        setattr(module, f"{prefix}_base", nn.Parameter(torch.zeros(n_out)))
        setattr(module, f"{prefix}_scale", nn.Parameter(torch.ones(3 if n_out != hc else 1)))

    def hc_mix(h, fn, base, scale):
        """Hyper-connection pre: (x [B, T, D], post [B, T, hc], comb [B, T, hc, hc]) from the streams h."""
        with fp32():
            flat = rms(h.flatten(2))
            m = F.linear(flat, fn)
            pre = torch.sigmoid(m[..., :hc] * scale[0] + base[:hc]) + HC_EPS
            post = 2 * torch.sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
            comb = (m[..., 2 * hc:] * scale[2] + base[2 * hc:]).view(*m.shape[:-1], hc, hc)
            comb = torch.softmax(comb, dim=-1) + HC_EPS
            comb = comb / (comb.sum(-2, keepdim=True) + HC_EPS)
            for _ in range(a["hc_sinkhorn_iters"] - 1):
                comb = comb / (comb.sum(-1, keepdim=True) + HC_EPS)
                comb = comb / (comb.sum(-2, keepdim=True) + HC_EPS)
            return (pre.unsqueeze(-1) * h).sum(2), post, comb

    def hc_expand(out, h, post, comb):
        with fp32():
            return post.unsqueeze(-1) * out.float().unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)

    def hc_collapse(h, fn, base, scale):
        with fp32():
            pre = torch.sigmoid(F.linear(rms(h.flatten(2)), fn) * scale[0] + base) + HC_EPS
            return (pre.unsqueeze(-1) * h).sum(2)

    class Block(nn.Module):
        def __init__(self, layer_id, generator):
            super().__init__()
            self.layer_id = layer_id
            self.attn_norm = RMSNorm(dim)
            self.ffn_norm = RMSNorm(dim)
            hc_params(self, "hc_attn", (2 + hc) * hc)
            hc_params(self, "hc_ffn", (2 + hc) * hc)
            self.attn = Attention(a["compress_ratios"][layer_id])
            self.ffn = MoE(layer_id, generator)

        def forward(self, h, ids, ctx):
            x, post, comb = hc_mix(h, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
            h = hc_expand(self.attn(self.attn_norm(x), ctx), h, post, comb)
            ctx.hidden.append(h)
            x, post, comb = hc_mix(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
            h = hc_expand(self.ffn(self.ffn_norm(x), ids, ctx), h, post, comb)
            ctx.hidden.append(h)
            return h

    class MTPBlock(Block):
        """DeepSeek's MTPBlock: embed(next token) and the main model's last streams in, logits of the token after."""

        def __init__(self, layer_id, generator):
            super().__init__(layer_id, generator)
            self.e_proj = Linear(dim, dim, "FP8")
            self.h_proj = Linear(dim, dim, "FP8")
            self.enorm = RMSNorm(dim)
            self.hnorm = RMSNorm(dim)
            self.norm = RMSNorm(dim)
            hc_params(self, "hc_head", hc)

    class Context:
        """Per-forward tables: RoPE, window and compressed-row visibility; collects the training side outputs."""

        def __init__(self, t, dev):
            self.t, self.dev = t, dev
            self.loads, self.indexer_losses, self.hidden = [], [], []
            self._tables = {}

        def _cos_sin(self, positions, compress):
            inv = torch.from_numpy(rope_inv_freq(a, compress)).to(self.dev)
            angles = positions.to(torch.float32)[:, None] * inv[None, :]
            return angles.cos(), angles.sin()

        def table(self, compress):
            key = ("t", compress)
            if key not in self._tables:
                self._tables[key] = self._cos_sin(torch.arange(self.t, device=self.dev), compress)
            return self._tables[key]

        def rows_table(self, ratio, n):
            key = ("r", ratio, n)
            if key not in self._tables:
                self._tables[key] = self._cos_sin(torch.arange(n, device=self.dev) * ratio, True)
            return self._tables[key]

        def window_bias(self):
            if "w" not in self._tables:
                p = torch.arange(self.t, device=self.dev)
                ok = (p[None, :] <= p[:, None]) & (p[None, :] > p[:, None] - a["window_size"])
                self._tables["w"] = torch.zeros(self.t, self.t, device=self.dev).masked_fill(~ok, float("-inf"))[None]
            return self._tables["w"]

        def visible(self, ratio, n):
            key = ("v", ratio, n)
            if key not in self._tables:
                p = torch.arange(self.t, device=self.dev)
                self._tables[key] = (torch.arange(n, device=self.dev)[None, :] < ((p + 1) // ratio)[:, None])[None]
            return self._tables[key]

    class V4(nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            self.quant = quant
            self.args = a
            self.embed = nn.Module()
            self.embed.weight = nn.Parameter(torch.randn(a["vocab_size"], dim) * std)
            self.layers = nn.ModuleList(Block(i, generator) for i in range(a["n_layers"]))
            self.norm = RMSNorm(dim)
            hc_params(self, "hc_head", hc)
            self.head = nn.Module()
            self.head.weight = nn.Parameter(torch.randn(a["vocab_size"], dim) * std)
            n_mtp = len(a["compress_ratios"]) - a["n_layers"]
            self.mtp = nn.ModuleList(MTPBlock(a["n_layers"] + m, generator) for m in range(n_mtp))

        def logits_of(self, y):
            return F.linear(y, q(self.head.weight, "BF16"))

        def forward(self, ids, mtp_ids=None):
            """ids [B, T] -> (logits [B, T, V], mtp logits [B, T-1, V] of the token after next or None, context).
            mtp_ids: the next tokens [B, T-1] (ids shifted by one) that the MTP block embeds."""
            b, t = ids.shape
            ctx = Context(t, ids.device)
            h = q(self.embed.weight, "BF16")[ids].float().unsqueeze(2).expand(b, t, hc, dim).contiguous()
            ctx.hidden.append(h)
            for layer in self.layers:
                h = layer(h, ids, ctx)
            y = self.norm(hc_collapse(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale))
            logits = self.logits_of(y)
            mtp_logits = None
            if mtp_ids is not None and len(self.mtp):
                block = self.mtp[0]
                mctx = Context(t - 1, ids.device)
                e = block.enorm(q(self.embed.weight, "BF16")[mtp_ids])
                hm = block.e_proj(e).float().unsqueeze(2) + block.h_proj(block.hnorm(h[:, :-1])).float()
                hm = block(hm, mtp_ids, mctx)
                ym = block.norm(hc_collapse(hm, block.hc_head_fn, block.hc_head_base, block.hc_head_scale))
                mtp_logits = self.logits_of(ym)
                ctx.loads.extend(mctx.loads)
            return logits, mtp_logits, ctx

    return V4().to(device)


def official_tensors(model):
    """name -> float32 (int64 for tid2eid) numpy array in the release's naming, experts unstacked."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        value = tensor.detach().cpu()
        value = value.float().numpy() if value.is_floating_point() else value.numpy().astype(np.int64)
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".ffn") and leaf in ("w1", "w2", "w3"):
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{leaf}.weight"] = value[e]
        else:
            out[name] = value
    return out


def load_official(model, tensors):
    """Inverse of official_tensors: set the model's parameters and buffers from release-named arrays."""
    torch = _torch()
    state = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".ffn") and leaf in ("w1", "w2", "w3"):
            value = np.stack([tensors[f"{prefix}.experts.{e}.{leaf}.weight"] for e in range(tensor.shape[0])])
        else:
            value = tensors[name]
        state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(tensor.dtype)
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

def pieces_of(offsets, limit):
    """(start, end) token ranges: the documents, long ones cut into pieces of at most `limit` tokens."""
    out = []
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        out.extend((p, min(p + limit, e)) for p in range(s, e, limit))
    return out


def pack_rows(ids, pieces, order, width):
    """Rows [n, width] of the pieces in `order`, each row filled from document starts; -1 pads the tails."""
    rows, row, used = [], np.full(width, -1, dtype=np.int64), 0
    for i in order:
        s, e = pieces[i]
        if used + (e - s) > width and used:
            rows.append(row)
            row, used = np.full(width, -1, dtype=np.int64), 0
        row[used:used + e - s] = ids[s:e]
        used += e - s
    if used:
        rows.append(row)
    return np.stack(rows)


def batch_tensors(rows, device):
    """inputs [B, L], targets [B, L], MTP inputs [B, L-1] and targets [B, L-1] (-100 = no loss) from rows [B, L+1]."""
    torch = _torch()
    r = torch.from_numpy(rows).to(device)
    tokens = torch.where(r < 0, torch.full_like(r, 2), r)  # pads read as <｜▁pad▁｜>
    labels = torch.where(r < 0, torch.full_like(r, -100), r)
    return tokens[:, :-1], labels[:, 1:], tokens[:, 1:-1], labels[:, 2:]


def versions():
    torch = _torch()
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["device_name"] = torch.cuda.get_device_name(0)
    return out


def greedy(model, ids, n, eos):
    """Greedy continuation by uncached full forwards (the model is small)."""
    torch = _torch()
    dev = next(model.parameters()).device
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _, _ = model(torch.tensor([seq], device=dev))
            token = int(logits[0, -1].argmax())
            seq.append(token)
            if token == eos:
                break
    return seq[len(ids):]


def decode(work, ids):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(work / "tokenizer.json")).decode(ids, skip_special_tokens=False)


def save_checkpoint(out, state):
    """The run's whole state in out/checkpoint.pt, atomically: a kill at any moment leaves the previous one whole."""
    torch = _torch()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    out.mkdir(parents=True, exist_ok=True)
    ref.write_atomic(out / CHECKPOINT, buffer.getvalue())


def resume(out, threads=None, compile_model=False, checkpoint_every=None):
    """Continue the run whose checkpoint is in `out` where it stopped, with its own settings; only how this
    session runs (threads, compile, checkpoint interval) is chosen anew."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"train --resume: no {CHECKPOINT} in {out}")
    state = _torch().load(path, weights_only=False)  # our own file: numpy arrays and RNG states besides tensors
    if state.get("format") != FORMAT_VERSION:
        raise SystemExit(f"train --resume: {path} has format {state.get('format')}, "
                         f"this script writes {FORMAT_VERSION}")
    settings = dict(state["settings"], work=Path(state["settings"]["work"]))
    if checkpoint_every is None:
        checkpoint_every = settings.pop("checkpoint_every")
    else:
        settings.pop("checkpoint_every")
    return train(out=Path(out), threads=threads, compile_model=compile_model, checkpoint_every=checkpoint_every,
                 state=state, **settings)


def train(work, out, device="cpu", minutes=3.0, steps=None, tokens_target=None, batch=None, seq_len=None, lr=2e-3,
          seed=SEED, quant_fraction=0.2, mtp_weight=0.3, indexer_weight=0.1, threads=None, compile_model=False,
          weight_decay=0.1, n_evals=8, valid_rows=None, patience=None, checkpoint_every=None, init=None, state=None):
    """Train on the prepared corpus in `work`; write the release-layout checkpoint and train.json into `out`.

    With a validation split (prepare's valid_ids.npy), `n_evals` evaluations spread over the run measure the loss
    on it as the release will be written (fake quantization on); the weights of the best one are the ones written
    (early stopping), and after `patience` evaluations without a better one the run ends. The held-out text is
    evaluated once, on the written weights, for the record only.

    The schedule runs to `steps`, else to `tokens_target` training tokens, else to `minutes` of training time.
    With `checkpoint_every` (minutes; 0: after every step) the run's whole state goes to out/checkpoint.pt at that
    interval and when the run ends (finished, early-stopped or SIGTERM, which ends it at the next step boundary);
    `state` is such a checkpoint (see resume), from which the run continues as if it had not stopped. `init`: a
    release checkpoint (DeepSeek's layout, e.g. a fixture) whose weights the run starts from (a fine-tune; fresh
    optimizer state)."""
    import copy

    torch = _torch()
    import torch.nn.functional as F

    t_begin = time.time()
    if threads:
        torch.set_num_threads(threads)
    work = Path(work).resolve()
    settings = {"work": str(work), "device": device, "minutes": minutes, "steps": steps, "tokens_target": tokens_target,
                "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed, "quant_fraction": quant_fraction,
                "mtp_weight": mtp_weight, "indexer_weight": indexer_weight, "weight_decay": weight_decay,
                "n_evals": n_evals, "valid_rows": valid_rows, "patience": patience,
                "checkpoint_every": checkpoint_every, "init": init and str(init)}
    corpus = json.loads((work / "corpus.json").read_text())
    a = dict(SMALL_ARGS, vocab_size=corpus["vocab_size"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cuda = device.startswith("cuda")
    batch = batch or (64 if cuda else 4)  # on a CPU 4 x 256: the most tokens/s (docs/quality.md)
    seq_len = seq_len or (512 if cuda else 256)
    model = build_model(a, seed, device)
    if init and state is None:
        init_from_release(model, a, init)
    net = torch.compile(model) if compile_model else model
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("_fn")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("_fn"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)

    ids = np.load(work / "train_ids.npy").astype(np.int64)
    pieces = pieces_of(np.load(work / "train_offsets.npy"), seq_len + 1)
    held_ids = np.load(work / "heldout_ids.npy").astype(np.int64)
    held_pieces = pieces_of(np.load(work / "heldout_offsets.npy"), seq_len + 1)
    held_rows = pack_rows(held_ids, held_pieces, range(len(held_pieces)), seq_len + 1)[:16 if cuda else 4]
    valid_rows = valid_rows or (64 if cuda else 16)
    if (work / "valid_ids.npy").exists() and np.load(work / "valid_ids.npy").size:
        valid_ids = np.load(work / "valid_ids.npy").astype(np.int64)
        valid_pieces = pieces_of(np.load(work / "valid_offsets.npy"), seq_len + 1)
        # a seeded sample of the validation documents, the same rows at every evaluation
        order = np.random.default_rng(seed + 1).permutation(len(valid_pieces))
        eval_rows = pack_rows(valid_ids, valid_pieces, order, seq_len + 1)[:valid_rows]
    else:  # a corpus prepared without a validation split: the schedule runs to its end, the last weights are kept
        eval_rows = None
    prompts = json.loads((work / "prompts.json").read_text())

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def losses(rows):
        x, y, mx, my = batch_tensors(rows, device)
        with autocast():
            logits, mtp_logits, ctx = net(x, mx)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            mtp = F.cross_entropy(mtp_logits.float().flatten(0, 1), my.flatten())
            idx = torch.stack(ctx.indexer_losses).mean() if ctx.indexer_losses else ce.new_zeros(())
        return ce, mtp, idx, ctx

    def evaluate(rows, quant):
        model.eval()
        was, model.quant.on = model.quant.on, quant
        with torch.no_grad():
            ce, mtp = 0.0, 0.0
            for i in range(0, len(rows), batch):  # in training-sized batches: bounded memory
                c, m, _, _ = losses(rows[i:i + batch])
                n = len(rows[i:i + batch])
                ce, mtp = ce + float(c) * n, mtp + float(m) * n
        model.quant.on = was
        model.train()
        return ce / len(rows), mtp / len(rows)

    budget = minutes * 60.0
    warmup = 100 if cuda else 20
    best, since_best = None, 0
    log, evals, epoch, rows_left, step, tokens, skipped = [], [], 0, np.empty((0, seq_len + 1), np.int64), 0, 0, 0
    seconds_before, resumed_at = 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, tokens, epoch, skipped = state["step"], state["tokens"], state["epoch"], state["skipped"]
        rows_left, log, evals = state["rows_left"], state["log"], state["evals"]
        best, since_best, seconds_before = state["best"], state["since_best"], state["seconds"]
        resumed_at = state["resumed_at"] + [step]
    schedule_by = "steps" if steps is not None else "tokens" if tokens_target else "time"
    print(f"train: {n_params / 1e6:.2f}M parameters on {device}, batch {batch} x {seq_len}, "
          f"{len(pieces)} pieces of {ids.size} tokens, "
          + {"steps": f"{steps} steps", "tokens": f"{tokens_target} tokens", "time": f"{minutes} min"}[schedule_by]
          + (f", resumed at step {step}" if state is not None else ""), flush=True)
    model.train()
    stopped, signalled = None, []
    # TERM (a timeout, a kill) ends the run at the next step boundary, so that what is saved is a whole step's state
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: signalled.append(signum))
    t_train = time.time()

    def elapsed():
        return seconds_before + time.time() - t_train

    def progress():
        """Fraction of the run done: by steps or tokens when given (a run paused or slowed keeps its schedule),
        else by training time over all sessions (the schedule follows the budget on any machine; train.json
        records the steps it came to)."""
        if steps is not None:
            return step / steps if steps else 1.0
        return tokens / tokens_target if tokens_target else elapsed() / budget

    def checkpoint():
        save_checkpoint(out, {
            "format": FORMAT_VERSION, "settings": settings, "model": model.state_dict(), "opt": opt.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "step": step, "tokens": tokens,
            "epoch": epoch, "skipped": skipped, "rows_left": rows_left, "log": log, "evals": evals, "best": best,
            "since_best": since_best, "seconds": elapsed(), "resumed_at": resumed_at})

    last_saved = time.time()
    try:
        while True:
            if signalled:
                stopped = f"signal {signalled[0]}"
                print(f"  stopped at step {step}: {stopped}", flush=True)
                break
            frac = progress()
            if frac >= 1.0:
                break
            if len(rows_left) < batch:
                rows_left = np.concatenate([rows_left, pack_rows(ids, pieces, rng.permutation(len(pieces)), seq_len + 1)])
                epoch += 1
            rows, rows_left = rows_left[:batch], rows_left[batch:]
            model.quant.on = frac >= 1 - quant_fraction
            rate = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = rate
            ce, mtp, idx, ctx = losses(rows)
            loss = ce + mtp_weight * mtp + indexer_weight * idx
            ce, mtp, idx = ce.detach(), mtp.detach(), idx.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step += 1
            if not torch.isfinite(norm):  # a bad batch must not end the run: skip its update
                skipped += 1
                continue
            opt.step()
            with torch.no_grad():  # aux-loss-free balancing: raise the bias of under-loaded experts
                for gate, idx_used in ctx.loads:
                    load = torch.bincount(idx_used.flatten(), minlength=gate.bias.numel()).float()
                    gate.bias += 1e-3 * torch.sign(load.mean() - load)
            tokens += int((rows >= 0).sum())
            last = progress() >= 1.0
            if step % (10 if cuda else 5) == 0 or step == 1 or last:
                entry = {"step": step, "s": round(elapsed(), 1), "loss": round(ce.item(), 4),
                         "mtp": round(mtp.item(), 4), "indexer_kl": round(idx.item(), 4), "lr": round(rate, 6),
                         "quant": model.quant.on, "epoch": epoch, "tokens": tokens}
                log.append(entry)
                if step % (100 if cuda else 20) == 0 or step == 1 or last:
                    print(f"  step {step:5d} {entry['s']:7.1f}s {tokens / 1e6:6.3f}M tok loss {entry['loss']:.3f} "
                          f"mtp {entry['mtp']:.3f} idx {entry['indexer_kl']:.3f} lr {rate:.2e}"
                          f"{' q' if model.quant.on else ''} ep {epoch}", flush=True)
            if eval_rows is not None and (last or int(progress() * n_evals) > len(evals)):
                ce_v, mtp_v = evaluate(eval_rows, quant=True)
                evals.append({"step": step, "s": round(elapsed(), 1), "tokens": tokens,
                              "valid_loss": round(ce_v, 4), "valid_mtp": round(mtp_v, 4), "quant": model.quant.on})
                better = best is None or ce_v < best["valid_loss"]
                print(f"  validation loss {ce_v:.3f} (ppl {math.exp(ce_v):.1f}), mtp {mtp_v:.3f}"
                      f"{' best' if better else ''}", flush=True)
                if better:
                    best, since_best = dict(evals[-1], state=copy.deepcopy(model.state_dict())), 0
                else:
                    since_best += 1
                    if patience is not None and since_best >= patience:
                        print(f"  early stop: {patience} evaluations without a better validation loss", flush=True)
                        break
            if checkpoint_every is not None and time.time() - last_saved >= checkpoint_every * 60:
                checkpoint()
                last_saved = time.time()
        if checkpoint_every is not None:
            checkpoint()
    except (KeyboardInterrupt, RuntimeError, ValueError) as exc:  # keep what was learned (not saved: mid-step)
        stopped = f"{type(exc).__name__}: {exc}"
        print(f"  stopped at step {step}: {stopped}", flush=True)
        if step < 10:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    seconds = elapsed()

    if best is not None:
        model.load_state_dict(best.pop("state"))
        print(f"  keeping step {best['step']}: validation loss {best['valid_loss']:.3f}", flush=True)
    ce_h, mtp_h = evaluate(held_rows, quant=True)  # the record's figure; no decision reads it
    print(f"  held-out loss {ce_h:.3f} (ppl {math.exp(ce_h):.1f}), mtp {mtp_h:.3f}", flush=True)
    model.eval()
    model.quant.on = True
    samples = []
    for p in [] if stopped else prompts if cuda else prompts[:2]:  # uncached decoding: seconds a token on a CPU
        answer = greedy(model, p["ids"], 48 if cuda else 24, eos=1)
        samples.append({"prompt": p["text"], "think": p["think"], "ids": answer, "text": decode(work, answer)})
        print(f"  [{p['think']}] {p['text']!r} -> {samples[-1]['text']!r}", flush=True)
    model = model.cpu()
    write_release(model, a, out)
    record = {
        "format": FORMAT_VERSION, "args": a, "seed": seed, "device": device, "minutes": minutes,
        "steps": step, "schedule_by": schedule_by, "init": init and str(init), "tokens_target": tokens_target, "resumed_at": resumed_at,
        "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup,
        "schedule": f"linear warmup, cosine to 0.1x; AdamW (0.9, 0.95), wd {weight_decay} on matrices, clip 1.0",
        "weight_decay": weight_decay, "n_evals": n_evals, "valid_rows": None if eval_rows is None else len(eval_rows),
        "patience": patience, "best": best, "heldout_loss": round(ce_h, 4), "heldout_mtp": round(mtp_h, 4),
        "quant_fraction": quant_fraction, "mtp_weight": mtp_weight, "indexer_weight": indexer_weight,
        "stopped": stopped, "bias_update": 1e-3, "parameters": n_params, "tokens_seen": tokens, "epochs": epoch, "skipped_steps": skipped,
        "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "train_seconds": round(seconds, 1), "session_seconds": round(time.time() - t_begin, 1),
        "corpus": corpus, "versions": versions(), "log": log, "evals": evals, "samples": samples,
    }
    write_json(out / "train.json", record)
    print(f"train: {step} steps, {tokens} tokens, {seconds:.0f} s; release checkpoint -> {out}", flush=True)
    return record


def read_release(folder):
    """official name -> float32 values (int64 for tid2eid) of a release-layout checkpoint, decoded exactly from
    its FP8 / FP4 / BF16 storage (the inverse of write_release); `folder` also gives its inference/config.json."""
    sys.path.insert(0, str(ROOT))
    from quant import fp8
    from quant.safetensors_source import Checkpoint

    ck = Checkpoint(folder)
    out = {}
    try:
        for name, tensor in ck.tensors.items():
            if name.endswith(".scale"):
                continue
            stored = tensor.array()
            if tensor.dtype == "F8_E4M3":
                out[name] = fp8.dequant_fp8(stored, ck[name[:-len("weight")] + "scale"].array())
            elif ".experts." in name and tensor.dtype == "I8":
                out[name] = fp8.dequant_fp4(stored, ck[name[:-len("weight")] + "scale"].array())
            elif tensor.dtype == "BF16":
                out[name] = (stored.astype(np.uint32) << 16).view(np.float32)
            elif tensor.dtype in ("F32", "I64"):
                out[name] = np.array(stored)
            else:
                raise SystemExit(f"{tensor.file}: tensor {name} has dtype {tensor.dtype}, not a release format")
    finally:
        ck.close()
    return out


def init_from_release(model, a, folder):
    """Set the model's weights from the release checkpoint in `folder` (train --init), whose
    inference/config.json must be the model's."""
    folder = Path(folder)
    config = json.loads((folder / "inference" / "config.json").read_text())
    differ = sorted(k for k in set(a) | set(config) if a.get(k) != config.get(k))
    if differ:
        raise SystemExit(f"train --init: {folder / 'inference' / 'config.json'} differs from this model in "
                         + ", ".join(f"{k} ({config.get(k)!r} there, {a.get(k)!r} here)" for k in differ))
    tensors = read_release(folder)
    missing = sorted(set(official_tensors(model)) - set(tensors))
    if missing:
        raise SystemExit(f"train --init: {folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    load_official(model, tensors)


def write_release(model, a, out):
    """The model's weights on the release grids, in DeepSeek's layout: configs, two shards, index."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference").mkdir(exist_ok=True)
    ck = ref.Checkpoint(None)
    for name, value in official_tensors(model).items():
        ck.put(name, value)
    ref.write_checkpoint(out, ck, a)
    write_json(out / "config.json", ref.root_config(a))
    ref.write_atomic(out / "inference" / "config.json", (json.dumps(a, indent=4) + "\n").encode())
    return ck


# ---------------------------------------------------------------------------------------------------
# export: the fixture with transformers goldens
# ---------------------------------------------------------------------------------------------------

# The goldens' prompt: a two-turn conversation about modules the training never saw (operator and xml are held
# out), thinking mode, long enough to close an HCA window (at 127) and to have the indexer choose (more than
# index_topk compressed rows visible from position 68 on).
GOLDEN_MESSAGES = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": IDENTITY[0].format(example="json.dumps")},
    {"role": "user", "content": "What does operator.itemgetter do?"},
    {"role": "assistant", "reasoning_content": "The user asks about operator.itemgetter. It is a class in operator.",
     "content": "operator.itemgetter(item, /, *items) is a class in the operator module. Return a callable object "
                "that fetches the given item(s) from its operand. After f = itemgetter(2), the call f(r) returns "
                "r[2]."},
    {"role": "user", "content": "And what does xml.etree.ElementTree.parse do?"},
]
FIXTURE_FILES = ("config.json", "inference/config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", "train.json")

# What each committed fixture is for (export's README says it); another folder gets the first sentence alone.
ROLES = {
    "small_v4": ("the trained default model", "It is the README's embedded default: `flashlite quantize "
                 "tests/fixtures/small_v4 small_v4.gguf` and chat with it."),
    "small_v4_general": ("the model trained to its best validation loss", "It generalizes where small_v4 "
                         "recites: the yardstick for quantization quality (docs/quality.md), not the default."),
    "small_v4_edit": ("small_v4_general fine-tuned to copy the code it edits", "`train --init` from small_v4_general "
                      "on its corpus plus code-editing conversations (`prepare --edits`): the model for prompt "
                      "lookup's code-editing case (docs/speculative.md)."),
}
README = """\
# {name}: {role} (generated, do not edit)

A small DeepSeek V4 ({params:.1f}M parameters) trained by `tools/train_tiny.py` on the Python standard library's own
documentation, in DeepSeek's release layout. {purpose} The random-weight oracle `tiny_v4` stays the reference for
the exactness tests it serves; this model adds a forward pass on weights that learned something.

Made with: `prepare` on Python {python} (corpus sha256 {corpus}), `train` on {device} for {steps} steps
({schedule}; {tokens} tokens, {epochs} epochs; seed {seed}), `export` with {versions}.
Final training loss {loss}, held-out loss {heldout} (perplexity {ppl}). `train.json` holds the whole record
(configuration, schedule, loss curve, evaluations, sample answers, versions).

- `config.json`, `inference/config.json`, `model-0000{{1,2}}-of-00002.safetensors`, `model.safetensors.index.json`:
  the release layout (FP8 e4m3 128x128-block linears with ue8m0 scales, MXFP4 routed experts, BF16, F32 hc/sinks/
  ape/bias, I64 tid2eid), MTP block `mtp.0.*` included (trained; no golden, transformers does not run it).
- `tokenizer.json`, `tokenizer_config.json`: byte-level BPE of {vocab} ids trained on the corpus with V4's
  pre-tokenizer; ids 0/1/2 BOS/EOS/pad, the last four <｜User｜> <｜Assistant｜> <think> </think>.
- `heldout.txt`: documentation of modules the training never saw ({heldout_modules}), for perplexity.
- `goldens.npz`: as tiny_v4's (docs/oracle.md): transformers DeepseekV4ForCausalLM in float32 loaded from this
  folder with FineGrainedFP8Config(dequantize=True), uncached; prompt = a {T}-token two-turn conversation in
  thinking mode; {near} positions have a decision gap below 1e-2 and {tie} below 1e-4. The trainer's own torch
  forward on these weights differs from the golden logits by at most {own:.2g}.

Sample answers (greedy, from train.json):
{samples}
"""


def golden_prompt_ids(tokenizer_file):
    from tokenizers import Tokenizer

    chat = load_chat_template()
    text = chat.encode_messages(GOLDEN_MESSAGES, think="high")
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = tok.encode(text, add_special_tokens=False).ids
    if tok.decode(ids, skip_special_tokens=False) != text:
        raise RuntimeError("tokenizer does not round-trip the golden prompt")
    return np.array(ids, dtype=np.int32)


def hf_to_official(state, a):
    """transformers parameter names (DeepseekV4ForCausalLM) -> release names, the inverse of
    make_reference.hf_state_dict."""
    out = {off: state[hf].float().numpy() for off, hf in ref.HF_ROOT_NAMES.items()}
    inter = a["moe_inter_dim"]
    for i in range(a["n_layers"]):
        p = f"layers.{i}"
        for off, hf in ref.HF_LEAF_NAMES:
            key = f"model.{p}{hf}"
            if key in state:
                value = state[key]
                out[p + off] = value.numpy().astype(np.int64) if not value.is_floating_point() else value.float().numpy()
        gate_up = state[f"model.{p}.mlp.experts.gate_up_proj"].float().numpy()
        down = state[f"model.{p}.mlp.experts.down_proj"].float().numpy()
        for e in range(a["n_routed_experts"]):
            out[f"{p}.ffn.experts.{e}.w1.weight"] = gate_up[e, :inter]
            out[f"{p}.ffn.experts.{e}.w3.weight"] = gate_up[e, inter:]
            out[f"{p}.ffn.experts.{e}.w2.weight"] = down[e]
    return out


def export(work, release, fixture):
    """The fixture folder: the release checkpoint from `release`, the tokenizer and held-out text from `work`,
    transformers goldens, and a README."""
    torch = ref.deterministic_torch()
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    fixture.mkdir(parents=True, exist_ok=True)
    (fixture / "inference").mkdir(exist_ok=True)
    if release.resolve() != fixture.resolve():
        for name in FIXTURE_FILES:
            shutil.copyfile(release / name, fixture / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "heldout.txt"):
        shutil.copyfile(work / name, fixture / name)
    a = json.loads((fixture / "inference" / "config.json").read_text())
    record = json.loads((fixture / "train.json").read_text())

    quant = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    hf = DeepseekV4ForCausalLM.from_pretrained(fixture, quantization_config=quant, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = golden_prompt_ids(fixture / "tokenizer.json")
    goldens = ref.run_goldens(hf, ids, a)
    ref.write_atomic(fixture / "goldens.npz", ref.npz_bytes(goldens))

    # the trainer's forward on the exported values against transformers'
    state = {k: v for k, v in hf.state_dict().items()}
    own = build_model(a).eval()
    mtp = {k: v for k, v in official_tensors(own).items() if k.startswith("mtp.")}
    load_official(own, {**mtp, **hf_to_official(state, a)})
    with torch.no_grad():
        logits, _, _ = own(torch.from_numpy(ids.astype(np.int64))[None])
    own_diff = float(np.abs(logits[0].numpy() - goldens["logits"]).max())

    gap = goldens["decision_gap"]
    last = record["log"][-1] if record["log"] else {}
    heldout = record.get("heldout_loss", record["evals"][-1].get("heldout_loss") if record["evals"] else float("nan"))
    samples = "\n".join(f"- [{s['think']}] {s['prompt']!r} -> {s['text']!r}" for s in record["samples"])
    role, purpose = ROLES.get(fixture.name, ("a trained small V4", ""))
    schedule = {"steps": "a step target", "tokens": f"{record.get('tokens_target')} token target"}.get(
        record.get("schedule_by"), f"{record['minutes']} min budget")
    best = record.get("best")
    if best and best["step"] != record["steps"]:
        schedule += (f", early-stopped; the weights of the best validation evaluation, step {best['step']} "
                     f"(validation loss {best['valid_loss']})")
    text = README.format(
        name=fixture.name, role=role, purpose=purpose, schedule=schedule,
        params=record["parameters"] / 1e6, python=record["corpus"]["python"],
        corpus=record["corpus"]["corpus_sha256"][:16], device=record["versions"].get("device_name", record["device"]),
        steps=record["steps"], tokens=record["tokens_seen"], epochs=record["epochs"],
        seed=record["seed"], versions=", ".join(f"{k} {v}" for k, v in ref.versions().items()),
        loss=last.get("loss"), heldout=heldout, ppl=round(math.exp(heldout), 1), vocab=a["vocab_size"],
        heldout_modules=", ".join(record["corpus"]["heldout_modules"]), T=len(ids),
        near=int((gap < 1e-2).sum()), tie=int((gap < 1e-4).sum()), own=own_diff, samples=samples)
    ref.write_atomic(fixture / "README.md", text.encode())
    print(f"export: {len(ids)}-token golden prompt, {int((gap < 1e-4).sum())} near-tie positions; trainer forward "
          f"vs transformers max |diff| {own_diff:.3g}; greedy continuation "
          f"{decode(work, goldens['greedy_ids'].tolist())!r} -> {fixture}")
    return goldens, own_diff


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_work(p):
        p.add_argument("--work", type=Path, default=WORK, help="prepared corpus and tokenizer (default: %(default)s)")

    def add_train(p):
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default: %(default)s)")
        p.add_argument("--minutes", type=float, default=3.0, help="training time budget (default: %(default)s)")
        p.add_argument("--steps", type=int, default=None, help="exact number of steps (default: as many as fit)")
        p.add_argument("--tokens", type=float, default=None,
                       help="training tokens the schedule runs to, e.g. 8.5e6 (default: as many as --minutes fit)")
        p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 64 on cuda, 4 on cpu)")
        p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512 on cuda, 256 on cpu)")
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--seed", type=int, default=SEED)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--compile", action="store_true", help="torch.compile the model")
        p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
        p.add_argument("--evals", type=int, default=8, help="validation evaluations over the run (default: %(default)s)")
        p.add_argument("--valid-rows", type=int, default=None,
                       help="validation sequences per evaluation (default: 64 on cuda, 16 on cpu)")
        p.add_argument("--patience", type=int, default=None,
                       help="stop after this many evaluations without a better validation loss (default: never; "
                            "the best evaluation's weights are written either way)")

    p = sub.add_parser("prepare", help="corpus, held-out split and tokenizer")
    add_work(p)
    p.add_argument("--valid-every", type=int, default=VALID_EVERY,
                   help="one training module in N goes to the validation split (0: none; default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="use this tokenizer.json (e.g. the fixture's) instead of training one")
    p.add_argument("--edits", type=int, default=0, metavar="N",
                   help="add code-editing conversations on the standard library's source (tools/edit_corpus.py), up "
                        "to N edits of different kinds a function (default: none)")
    p = sub.add_parser("train", help="train; write the release-layout checkpoint and train.json")
    add_work(p)
    add_train(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: WORK/release)")
    p.add_argument("--checkpoint-every", type=float, default=None, metavar="MINUTES",
                   help="save the run's state to OUT/checkpoint.pt at this interval and at its end (default: never)")
    p.add_argument("--init", type=Path, default=None, metavar="RELEASE_DIR",
                   help="start from this release checkpoint's weights (a fine-tune), e.g. tests/fixtures/small_v4_general")
    p.add_argument("--resume", type=Path, default=None, metavar="OUT",
                   help="continue the run checkpointed in OUT with its own settings; only --threads, --compile and "
                        "--checkpoint-every apply (default: the run's interval)")
    p = sub.add_parser("export", help="fixture folder with transformers goldens")
    add_work(p)
    p.add_argument("--release", type=Path, default=None, help="trained checkpoint (default: WORK/release)")
    p.add_argument("--out", type=Path, default=FIXTURE, help="fixture folder (default: %(default)s)")
    p = sub.add_parser("all", help="prepare, train and export in a row")
    add_work(p)
    add_train(p)
    p.add_argument("--out", type=Path, default=FIXTURE, help="fixture folder (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        prepare(args.work, valid_every=args.valid_every, tokenizer=args.tokenizer, edits=args.edits)
    if args.command == "all":
        prepare(args.work)
    if args.command == "train" and args.resume:
        resume(args.resume, threads=args.threads, compile_model=args.compile, checkpoint_every=args.checkpoint_every)
    elif args.command in ("train", "all"):
        release = args.out if args.command == "train" and args.out else args.work / "release"
        train(args.work, release, device=args.device, minutes=args.minutes, steps=args.steps,
              tokens_target=args.tokens and int(args.tokens), batch=args.batch, seq_len=args.seq_len, lr=args.lr,
              seed=args.seed, threads=args.threads, compile_model=args.compile, weight_decay=args.weight_decay,
              n_evals=args.evals, valid_rows=args.valid_rows, patience=args.patience,
              checkpoint_every=getattr(args, "checkpoint_every", None), init=getattr(args, "init", None))
    if args.command == "export":
        export(args.work, args.release or args.work / "release", args.out)
    if args.command == "all":
        export(args.work, args.work / "release", args.out)


if __name__ == "__main__":
    main()
