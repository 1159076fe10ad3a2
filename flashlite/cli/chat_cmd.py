"""`flashlite chat`: an interactive conversation in the terminal, streamed, with reasoning shown apart."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import click

from flashlite.atomic import atomic_write
from flashlite.cli.run_cmd import load_model, load_options, spec_options, spec_summary

THINK_CHOICES = ("none", "high", "max")
ROLES = ("system", "user", "assistant")
PROMPT, MORE = "> ", "... "
CACHE_SUFFIX = ".kv.npz"  # /save writes the conversation's KV cache next to its JSON
BLOCK = '"""'
HELP = f"""commands:
  /think none|high|max   switch reasoning (no argument: show the current mode)
  /reset                 forget the conversation (keeps the system prompt)
  /save FILE             write the conversation as a JSON list of messages (and its KV cache as FILE.kv.npz)
  /load FILE             replace the conversation with one saved by /save (its cache too: no prefill again)
  /help                  this text
multi-line input: end a line with a backslash to continue it, or put {BLOCK} alone on a line to open a block and
again to close it. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt exits."""


class ConversationFileError(Exception):
    """A conversation file that cannot be read or is not a list of chat messages."""


def save_conversation(path: str, messages: list[dict]) -> None:
    """Write messages as JSON to path, whole or not at all."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(messages, f, ensure_ascii=False, indent=1)


def load_conversation(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConversationFileError(f"{path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversationFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ConversationFileError(f"{path}: expected a JSON list of messages, got {type(data).__name__}")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ConversationFileError(f"{path}: message {i} is not {{\"role\": one of {ROLES}, \"content\": text}}")
    return [{"role": m["role"], "content": m["content"]} for m in data]


def read_message(first: str | None = None) -> str:
    """One user message from stdin: a line, backslash-continued lines, or a triple-quoted block."""
    line = input(PROMPT) if first is None else first
    if line.strip() == BLOCK:
        lines = []
        while (line := input(MORE)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(MORE)
    lines.append(line)
    return "\n".join(lines)


class Styler:
    """Reasoning dim on a terminal; on a pipe, plain text between <think> markers so it stays apart."""

    def __init__(self, tty: bool):
        self.tty = tty
        self.kind = None

    def write(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self._switch(kind)
        sys.stdout.write(text)
        sys.stdout.flush()

    def end(self) -> None:
        self._switch(None)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _switch(self, kind: str | None) -> None:
        if self.kind == "reasoning":
            sys.stdout.write("\x1b[0m\n" if self.tty else "\n</think>\n")
        if kind == "reasoning":
            sys.stdout.write("\x1b[2m" if self.tty else "<think>\n")
        self.kind = kind


class Session:
    """The conversation and the sampling settings of one `flashlite chat`."""

    def __init__(self, model, system: str | None, think: str, sampling: dict):
        self.model = model
        self.system = system
        self.think = think
        self.sampling = sampling
        self.messages: list[dict] = []
        self.cache = model.new_cache()  # kept across turns: each answer prefills only what the last one did not
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, stopped: bool = False) -> bool:
        """Stream the answer to text; Ctrl-C stops it and keeps what came so far (stopped: before it starts).
        False when the question could not be answered (the error is printed)."""
        cancel = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
        if stopped:
            cancel.set()
        self.messages.append({"role": "user", "content": text})
        styler = Styler(sys.stdout.isatty())
        content = []
        done = None
        t0 = time.perf_counter()
        t_first = None
        try:
            for piece in self.model.chat(self.messages, think=self.think, stream=True, cancel=cancel,
                                         cache=self.cache, **self.sampling):
                if t_first is None:
                    t_first = time.perf_counter()
                if piece.kind == "done":
                    done = piece
                elif piece.kind in ("reasoning", "content"):
                    styler.write(piece.kind, piece.text)
                    if piece.kind == "content":
                        content.append(piece.text)
        except ValueError as exc:
            self.messages.pop()
            click.echo(f"error: {exc}", err=True)
            return False
        finally:
            signal.signal(signal.SIGINT, previous)
        t_end = time.perf_counter()
        styler.end()
        self.messages.append({"role": "assistant", "content": "".join(content)})
        if done.finish_reason == "cancelled":
            click.echo("[stopped]", err=True)
        click.echo(_speed(done.prompt_tokens, done.cached_tokens, done.completion_tokens, t0, t_first or t_end, t_end),
                   err=True)
        summary = spec_summary(self.model)
        if summary:
            click.echo(f"[{summary}]", err=True)
        return True

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/think":
            if arg and arg not in THINK_CHOICES:
                click.echo(f"error: /think takes one of {', '.join(THINK_CHOICES)}, got {arg!r}", err=True)
                return
            self.think = arg or self.think
            click.echo(f"think: {self.think}")
        elif name == "/reset":
            self.reset()
            click.echo("conversation reset")
        elif name in ("/save", "/load") and not arg:
            click.echo(f"error: {name} needs a FILE", err=True)
        elif name == "/save":
            try:
                save_conversation(arg, self.messages)
                self.model.save_cache(arg + CACHE_SUFFIX, self.cache)
            except OSError as exc:
                click.echo(f"error: cannot write {arg}: {exc.strerror or exc}", err=True)
                return
            click.echo(f"saved {len(self.messages)} messages to {arg} ({self.cache.pos} cached tokens to "
                       f"{arg + CACHE_SUFFIX})")
        elif name == "/load":
            try:
                self.messages = load_conversation(arg)
            except ConversationFileError as exc:
                click.echo(f"error: cannot load {exc}", err=True)
                return
            note = ""
            if os.path.exists(arg + CACHE_SUFFIX):
                try:
                    self.cache = self.model.load_cache(arg + CACHE_SUFFIX)
                    note = f", {self.cache.pos} cached tokens"
                except ValueError as exc:  # the next answer prefills it all instead
                    note = f"; its cache is not used: {exc}"
            click.echo(f"loaded {len(self.messages)} messages from {arg}{note}")
        elif name == "/help":
            click.echo(HELP)
        else:
            click.echo(f"error: unknown command {name!r} (try /help)", err=True)


def _finite(value: float, name: str) -> float:
    if value != value:  # NaN passes click's range checks, whose comparisons are all false for it
        raise click.BadParameter("NaN is not a number", param_hint=name)
    return value


def _speed(n_prompt: int, n_cached: int, n_out: int, t0: float, t_first: float, t_end: float) -> str:
    def rate(n, seconds):
        return f"{n / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"

    prefill, decode = t_first - t0, t_end - t_first
    fed = n_prompt - n_cached
    return (f"[prefill {fed} tokens ({n_cached} cached) in {prefill:.2f} s, {rate(fed, prefill)} | "
            f"decode {max(n_out - 1, 0)} tokens in {decode:.2f} s, {rate(max(n_out - 1, 0), decode)}]")


def _interact(session: Session) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    click.echo("type /help for commands; Ctrl-D exits", err=True)
    while True:
        try:
            text = read_message()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not text.strip():
            continue
        if text.startswith("/"):
            session.command(text)
            continue
        asked = len(session.messages)
        try:
            session.ask(text)
        except KeyboardInterrupt:
            # Ctrl-C pressed with the Enter reaches Python at the call above, before ask() takes Ctrl-C over
            if len(session.messages) == asked:
                session.ask(text, stopped=True)


@click.command("chat")
@click.option("-m", "--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="deepseek4 GGUF file")
@click.option("-c", "--ctx-size", "ctx", default=None, type=click.IntRange(min=1),
              help="context length (default: the model's)")
@click.option("-t", "--threads", default=None, type=click.IntRange(1, 256), help="threads, 1..256 (default: one per physical core, one fewer from 8)")
@click.option("-n", "--n-predict", "--predict", "n_predict", default=None, type=click.IntRange(min=1),
              help="most tokens per answer (default: until the end of the answer or the context)")
@click.option("-p", "--prompt", default=None,
              help="first message, sent at once (stdin not a terminal: answer and exit)")
@click.option("-f", "--file", "prompt_file", default=None, type=click.File("r", encoding="utf-8"),
              help="file whose text is the first message")
@click.option("-sys", "--system-prompt", "system", default=None, help="system prompt")
@click.option("-sysf", "--system-prompt-file", "system_file", default=None, type=click.File("r", encoding="utf-8"),
              help="file whose text is the system prompt")
@click.option("--think", default="none", show_default=True, type=click.Choice(THINK_CHOICES), help="reasoning mode")
@click.option("--temp", "--temperature", "temperature", default=1.0, show_default=True, type=click.FloatRange(0.0, 1e6),
              callback=lambda ctx, param, v: _finite(v, "--temp"), help="sampling temperature (0: greedy)")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: off")
@click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("-s", "--seed", default=None, type=int, help="sampling seed (default: random)")
@load_options
@spec_options
def chat(model_path, ctx, threads, n_predict, prompt, prompt_file, system, system_file, think, temperature, top_p,
         top_k, min_p, seed, load_opts, spec_opts):
    """Chat with a model in the terminal; /help lists the commands."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give at most one of -p/--prompt and -f/--file")
    if system is not None and system_file is not None:
        raise click.UsageError("give at most one of -sys/--system-prompt and -sysf/--system-prompt-file")
    if system_file is not None:
        system = system_file.read()
    first = prompt_file.read() if prompt_file is not None else prompt
    model = load_model(model_path, threads, ctx, load_opts, spec_opts)
    sampling = {"max_tokens": n_predict, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "min_p": min_p, "seed": seed}
    session = Session(model, system, think, sampling)
    if first is not None and first.strip():
        answered = session.ask(first)
        if sys.stdin is None or not sys.stdin.isatty():  # a closed stdin: answer once, as for a pipe
            if not answered:
                raise SystemExit(1)
            return
    _interact(session)
