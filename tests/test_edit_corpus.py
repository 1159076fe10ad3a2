"""tools/edit_corpus.py's code-editing conversations: every edit parses and differs from its source by the edit
asked and nothing else (checked here on the text, by tokens and lines, independently of the generator's tree
check), and train_tiny keeps the held-out modules' functions out of the training split."""
import io
import sys
import tokenize
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import edit_corpus as ec  # noqa: E402
import train_tiny as tt  # noqa: E402

SOURCE = '''def scale(values, factor):
    total = 0
    for v in values:
        total += v * factor
    values.factor = factor
    return total / 3
'''


@pytest.fixture(scope="module")
def stdlib():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods = tt.stdlib_modules()
    return mods, ec.source_functions(mods)


def _tokens(src):
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT)
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in skip]


def _quoted(ask, start, end):
    return ask[ask.index(start) + len(start):ask.index(end, ask.index(start) + len(start))]


def check_edit(edit):
    """The edited text compiles and is the source changed as the ask says, and in no other way."""
    src, out, ask = edit["source"], edit["edited"], edit["ask"]
    compile(out, "<edited>", "exec")
    kind = edit["kind"]
    if kind in ("rename_parameter", "rename_local", "change_constant"):
        old, new = ask.split()[3], ask.split()[5]
        a, b = _tokens(src), _tokens(out)
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert changed and all(x[1] == old and y[1] == new for x, y in changed)
        if kind == "change_constant":
            assert len(changed) == 1 and changed[0][0][0] == tokenize.NUMBER
        else:  # attributes and keyword arguments of the same spelling are not the variable
            after_dot = [i for i, t in enumerate(a) if t == (tokenize.NAME, old) and i and a[i - 1][1] == "."]
            assert all(b[i] == a[i] for i in after_dot)
        return
    src_lines, out_lines = src.split("\n"), out.split("\n")
    if kind == "delete_statement":
        line = _quoted(ask, "`", "`")
        gone = [i for i in range(len(src_lines)) if src_lines[:i] + src_lines[i + 1:] == out_lines]
        assert gone and src_lines[gone[0]].strip() == line
        return
    added = [i for i in range(len(out_lines)) if out_lines[:i] + out_lines[i + 1:] == src_lines]
    assert added, "not the source with one line added"
    line = out_lines[added[0]].strip()
    assert line == (_quoted(ask, "`", "`") if kind == "add_assert" else '"""' + _quoted(ask, '"', '"') + '"""')
    assert added[0] > 0 and out_lines[added[0]].startswith("    ")


@pytest.mark.parametrize("kind, wanted, expected", [
    ("rename_parameter", " factor ", SOURCE.replace("factor", "NEW").replace("values.NEW", "values.factor")),
    ("rename_local", " total ", SOURCE.replace("total", "NEW")),
    ("change_constant", " 3 ", SOURCE.replace("total / 3", "total / 6")),
    ("delete_statement", "values.factor", SOURCE.replace("    values.factor = factor\n", "")),
    ("add_assert", " values ", SOURCE.replace("):\n", "):\n    assert values is not None\n", 1)),
    ("add_docstring", "", SOURCE.replace("):\n", '):\n    """Scale: takes values, factor."""\n', 1)),
])
def test_each_edit_on_a_known_function(kind, wanted, expected):
    rng = np.random.default_rng(0)
    edit = ec.make_edit(kind, SOURCE, rng)
    while wanted not in edit["ask"]:  # the edit's random choice (which name, constant, line) until the one wanted
        edit = ec.make_edit(kind, SOURCE, rng)
    if kind.startswith("rename"):
        expected = expected.replace("NEW", edit["ask"].split()[5])
    assert edit["edited"] == expected
    check_edit(edit)


def test_edits_that_do_not_apply_are_none():
    bare = "def f():\n    return g()\n"
    rng = np.random.default_rng(0)
    assert all(ec.make_edit(k, bare, rng) is None
               for k in ("rename_parameter", "rename_local", "change_constant", "delete_statement", "add_assert"))
    with pytest.raises(ValueError, match="edit kind 'swap'"):
        ec.make_edit("swap", bare, rng)


def test_every_stdlib_edit_is_the_edit_asked_and_nothing_else(stdlib):
    _, functions = stdlib
    assert len(functions) > 2000
    edits = ec.edits_of(functions, np.random.default_rng(3))
    kinds = {k: sum(e["kind"] == k for e in edits) for k in ec.KINDS}
    assert all(n > 100 for n in kinds.values()), kinds
    for edit in edits:
        check_edit(edit)


def test_held_out_functions_stay_out_of_training(stdlib):
    mods, functions = stdlib
    chat = tt.load_chat_template()
    train, valid, heldout = tt.edit_conversations(mods, tt.SEED, tt.VALID_EVERY, chat)
    assert len(heldout) > 100 and len(valid) > 100 and len(train) > 3000
    tops = {e["module"].split(".")[0] for e in heldout}
    assert tops and all(tt.held_out({"module": t}) for t in tops)
    training_text = "\n".join(train)
    held_sources = {e["source"] for e in heldout}
    # a held-out function's source in a training conversation only where another module has the same text
    elsewhere = {src for m, _, src in functions if not tt.held_out({"module": tt.MODULE_ALIASES.get(m, m)})}
    assert not [s for s in held_sources - elsewhere if s in training_text]


def test_bench_edit_prompt_is_a_held_out_function(stdlib):
    sys.path.insert(0, str(ROOT))
    import bench_spec

    _, functions = stdlib
    (module, src), = [(m, s) for m, q, s in functions if q == "_append_child"]
    assert module == "xml.dom.minidom" and tt.held_out({"module": module})
    ask = ec.ASK["rename_parameter"].format(old="node", new="item")
    assert bench_spec.EDIT == f"{ask}\n\n```python\n{src}```"
