"""Code-editing conversations from the Python standard library's own source, for tools/train_tiny.py.

A short function's source goes in the user turn with an edit asked in words; the answer is the whole edited
function, so that most of it copies the prompt (what prompt lookup and a copying MTP head draft well). Every edit
is made on the source text at positions that `ast` gives, then checked: the edited text parses, and its tree is
the source's tree with exactly the asked change applied to the tree (the same change made a second way), so the
answer differs from the prompt by the edit and nothing else.

Edits: rename a parameter, rename a local variable, change an integer constant, delete a one-line statement,
add an assert as the first statement, add a docstring.
"""

import ast
import copy
import inspect
import textwrap

# Functions whose source fits, with the edited copy, in one 256-token training row, and whose copy stays within
# the model's 128-token attention window (about 3 characters a token on code for the corpus' tokenizer).
MIN_CHARS, MAX_CHARS, MAX_LINES = 100, 330, 14
NEW_NAMES = ("value", "item", "data", "obj", "arg", "text", "count", "result", "name", "key", "size", "index",
             "other", "source", "target", "entry", "node", "line", "path", "values", "total", "first", "limit")
ASK = {
    "rename_parameter": "Rename the parameter {old} to {new} in this function and show the whole function:",
    "rename_local": "Rename the variable {old} to {new} in this function and show the whole function:",
    "change_constant": "Change the number {old} to {new} in this function and show the whole function:",
    "delete_statement": "Delete the line `{old}` from this function and show the whole function:",
    "add_assert": "Add `{new}` as the first statement of this function and show the whole function:",
    "add_docstring": "Add the docstring \"{new}\" to this function and show the whole function:",
}
SAY = {
    "rename_parameter": "Here is the function with the parameter {old} renamed to {new}:",
    "rename_local": "Here is the function with the variable {old} renamed to {new}:",
    "change_constant": "Here is the function with {old} changed to {new}:",
    "delete_statement": "Here is the function without that line:",
    "add_assert": "Here is the function with the assert added:",
    "add_docstring": "Here is the function with its docstring:",
}
KINDS = tuple(ASK)


def source_functions(modules):
    """(module name, qualified name, dedented source) for the short functions and methods (not nested, not
    decorated) in the source files of `modules` (name -> module object), ASCII only, without tabs or f-strings."""
    out, seen = [], set()
    for modname, module in modules.items():
        try:
            path = inspect.getsourcefile(module)
            text = open(path, encoding="utf-8").read() if path else None
        except (TypeError, OSError, UnicodeDecodeError):
            continue
        if not text or path in seen:
            continue
        seen.add(path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        candidates = [(node.name, node) for node in tree.body if isinstance(node, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            candidates += [(f"{cls.name}.{n.name}", n) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for qualname, node in candidates:
            if node.decorator_list:
                continue
            src = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])) + "\n"
            if not (MIN_CHARS <= len(src) <= MAX_CHARS and src.count("\n") <= MAX_LINES) or not src.isascii():
                continue
            if "\t" in src or "\\\n" in src:
                continue
            try:
                fn = ast.parse(src).body[0]
            except SyntaxError:
                continue
            if any(isinstance(n, (ast.JoinedStr, ast.Global, ast.Nonlocal)) for n in ast.walk(fn)):
                continue
            out.append((modname, qualname, src))
    return out


def _names(fn):
    """Every identifier the function's tree spells (names, parameters, attributes, keywords, the function)."""
    found = {fn.name}
    for n in ast.walk(fn):
        found.update(v for v in (getattr(n, "id", None), getattr(n, "arg", None), getattr(n, "attr", None),
                                 getattr(n, "name", None)) if isinstance(v, str))
    return found


def _replace_at(src, spans, text):
    """src with each (line, col, end_col) span (ast positions: 1-based lines, byte columns on ASCII) -> text."""
    lines = src.split("\n")
    for line, col, end in sorted(spans, reverse=True):
        lines[line - 1] = lines[line - 1][:col] + text + lines[line - 1][end:]
    return "\n".join(lines)


def _docstring_node(fn):
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


class _Rename(ast.NodeTransformer):
    def __init__(self, old, new):
        self.old, self.new = old, new

    def visit_Name(self, node):
        if node.id == self.old:
            node.id = self.new
        return node

    def visit_arg(self, node):
        if node.arg == self.old:
            node.arg = self.new
        return node


def _rename(src, fn, old, new):
    """(edited source, expected tree) renaming every use of the variable `old` (names and parameters)."""
    spans = [(n.lineno, n.col_offset, n.col_offset + len(old)) for n in ast.walk(fn)
             if (isinstance(n, ast.Name) and n.id == old) or (isinstance(n, ast.arg) and n.arg == old)]
    return _replace_at(src, spans, new), _Rename(old, new).visit(copy.deepcopy(fn))


def _new_name(fn, old, rng):
    taken = _names(fn)
    free = [n for n in NEW_NAMES if n not in taken and n != old]
    return free[rng.integers(len(free))] if free else None


def _edit(kind, src, fn, rng):
    """(ask fields, edited source, expected tree) of one edit of `kind`, or None where it does not apply."""
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    body = fn.body[1:] if _docstring_node(fn) else fn.body
    if kind == "rename_parameter":
        choices = [p for p in params if p in used]
        if not choices:
            return None
        old = choices[rng.integers(len(choices))]
        new = _new_name(fn, old, rng)
        return None if new is None else ({"old": old, "new": new}, *_rename(src, fn, old, new))
    if kind == "rename_local":
        stored = sorted({n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                        - set(params) - {"self", "cls"})
        if not stored:
            return None
        old = stored[rng.integers(len(stored))]
        new = _new_name(fn, old, rng)
        return None if new is None else ({"old": old, "new": new}, *_rename(src, fn, old, new))
    if kind == "change_constant":
        ints = [n for n in ast.walk(fn) if isinstance(n, ast.Constant) and type(n.value) is int]
        once = [n for n in ints if sum(m.value == n.value for m in ints) == 1 and n.lineno == n.end_lineno
                and ast.get_source_segment(src, n) == str(n.value)]
        if not once:
            return None
        node = once[rng.integers(len(once))]
        value = node.value + 1 if node.value in (0, 1) else node.value * 2
        edited = _replace_at(src, [(node.lineno, node.col_offset, node.end_col_offset)], str(value))
        expected = copy.deepcopy(fn)
        for n in ast.walk(expected):
            if isinstance(n, ast.Constant) and type(n.value) is int and n.value == node.value:
                n.value = value
        return {"old": str(node.value), "new": str(value)}, edited, expected
    if kind == "delete_statement":
        lines = src.split("\n")
        blocks = [b for n in ast.walk(fn) for b in (getattr(n, f, None) for f in ("body", "orelse", "finalbody"))
                  if isinstance(b, list) and len(b) >= 2]
        if fn.body and _docstring_node(fn):
            blocks = [b if b is not fn.body else fn.body[1:] for b in blocks]
            blocks = [b for b in blocks if len(b) >= 2]
        simple = [(b, i) for b in blocks for i, s in enumerate(b)
                  if isinstance(s, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)) and s.lineno == s.end_lineno
                  and lines[s.lineno - 1].strip() == ast.get_source_segment(src, s)]
        if not simple:
            return None
        block, i = simple[rng.integers(len(simple))]
        stmt = block[i]
        edited = "\n".join(lines[:stmt.lineno - 1] + lines[stmt.lineno:])
        expected = copy.deepcopy(fn)  # the same statement in the copy is found by its position
        for n in ast.walk(expected):
            for f in ("body", "orelse", "finalbody"):
                b = getattr(n, f, None)
                if isinstance(b, list):
                    setattr(n, f, [s for s in b if not (isinstance(s, ast.stmt) and s.lineno == stmt.lineno
                                                       and s.col_offset == stmt.col_offset)])
        return {"old": lines[stmt.lineno - 1].strip()}, edited, expected
    if kind == "add_assert":
        choices = [p for p in params if p in used]
        if not choices or not body:
            return None
        p = choices[rng.integers(len(choices))]
        stmt = f"assert {p} is not None"
        first = body[0]
        lines = src.split("\n")
        edited = "\n".join(lines[:first.lineno - 1] + [" " * first.col_offset + stmt] + lines[first.lineno - 1:])
        expected = copy.deepcopy(fn)
        expected.body.insert(len(fn.body) - len(body), ast.parse(stmt).body[0])
        return {"new": stmt}, edited, expected
    if kind == "add_docstring":
        if _docstring_node(fn) or not fn.body:
            return None
        words = fn.name.strip("_").replace("_", " ")
        takes = ", ".join(params) if params else "no arguments"
        doc = f"{words.capitalize()}: takes {takes}."
        first = fn.body[0]
        lines = src.split("\n")
        edited = "\n".join(lines[:first.lineno - 1] + [" " * first.col_offset + f'"""{doc}"""']
                           + lines[first.lineno - 1:])
        expected = copy.deepcopy(fn)
        expected.body.insert(0, ast.Expr(ast.Constant(doc)))
        return {"new": doc}, edited, expected
    raise ValueError(f"edit kind {kind!r}: one of {', '.join(KINDS)}")


def make_edit(kind, src, rng):
    """{kind, ask, say, source, edited} for one checked edit of `kind` on the function `src`, or None where the
    edit does not apply (or its check fails: the edited text must parse to the expected tree)."""
    fn = ast.parse(src).body[0]
    made = _edit(kind, src, fn, rng)
    if made is None:
        return None
    fields, edited, expected = made
    try:
        got = ast.parse(edited).body[0]
    except SyntaxError:
        return None
    if ast.dump(got) != ast.dump(expected) or edited == src:
        return None
    return {"kind": kind, "ask": ASK[kind].format(**{"old": "", "new": "", **fields}),
            "say": SAY[kind].format(**{"old": "", "new": "", **fields}), "source": src, "edited": edited}


def user_text(edit):
    return f"{edit['ask']}\n\n```python\n{edit['source']}```"


def answer_text(edit):
    return f"{edit['say']}\n\n```python\n{edit['edited']}```"


def edits_of(functions, rng, per_function=2):
    """Up to `per_function` checked edits of different kinds per (module, qualname, source) function."""
    out = []
    for module, qualname, src in functions:
        made = 0
        for k in rng.permutation(len(KINDS)):
            if made == per_function:
                break
            edit = make_edit(KINDS[k], src, rng)
            if edit is not None:
                out.append(dict(edit, module=module, function=qualname))
                made += 1
    return out
