"""A small desktop chat window on flashlite's Python API (tkinter, the standard library's toolkit).

    python examples/desktop_chat.py [MODEL.gguf ...] [--think none|high|max]

Pick a model (the list holds those named on the command line; "Open..." adds one), watch it load, type a message and
press Enter: the answer streams into the conversation, its reasoning into the pane below it. Stop (or Escape) ends
an answer where it is; New chat forgets the conversation.

How it keeps the window alive: tkinter may only be touched from the thread that runs its main loop (the UI
thread), and a load or an answer takes seconds to minutes. So `flashlite.load` and `Model.chat` run on worker
threads, which only put events on a queue.Queue; the UI thread reads the queue every few milliseconds (`after`)
and updates the widgets. The UI thread itself only sets the threading.Event that cancels an answer (Stop) and
reads what the events carry: it never calls into the model. See "Threads" in docs/api.md.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

import flashlite  # noqa: E402

POLL_MS = 20
USER_COLOUR, ANSWER_COLOUR, REASONING_COLOUR, REASONING_BG = "#0b5394", "#1b1b1b", "#6d4c00", "#fff4d6"
OPEN = "Open..."


class ChatWindow:
    def __init__(self, root: tk.Tk, models: list[str], think: str = "none", max_tokens: int | None = 512,
                 temperature: float = 0.6, events: bool = False, delay: float = 0.0):
        self.root, self.max_tokens, self.temperature, self.delay = root, max_tokens, temperature, delay
        self.echo = events  # print what happens as JSON lines on stdout (for scripts and tests)
        self.queue: queue.Queue = queue.Queue()
        self.model = None
        self.model_path = None
        self.loading = None          # the path being loaded
        self.pending_load = None     # a model picked while an answer was streaming: loaded once it ends
        self.cancel = None           # the running answer's threading.Event
        self.messages: list[dict] = []
        self.cache = None
        self.answer = {"reasoning": "", "content": ""}
        self.progress_calls = 0
        self.last_drain = time.monotonic()
        self.max_gap = 0.0  # the longest the UI thread went without reading the queue while a worker ran

        root.title("flashlite chat")
        root.geometry("760x560")
        root.minsize(480, 360)
        top = ttk.Frame(root, padding=(8, 8, 8, 4))
        top.pack(fill="x")
        ttk.Label(top, text="Model").pack(side="left")
        self.picker = ttk.Combobox(top, state="readonly", width=38, values=[*models, OPEN])
        self.picker.pack(side="left", padx=(4, 8))
        self.picker.bind("<<ComboboxSelected>>", self._picked)
        ttk.Label(top, text="Reasoning").pack(side="left")
        self.think = ttk.Combobox(top, state="readonly", width=6, values=["none", "high", "max"])
        self.think.set(think)
        self.think.pack(side="left", padx=(4, 8))
        self.bar = ttk.Progressbar(top, length=140, maximum=100.0, mode="determinate")
        self.bar.pack(side="left", fill="x", expand=True)

        panes = ttk.PanedWindow(root, orient="vertical")
        panes.pack(fill="both", expand=True, padx=8)
        self.transcript = tk.Text(panes, wrap="word", state="disabled", height=14, relief="flat", padx=8, pady=6,
                                  background="#ffffff", font=("TkDefaultFont", 11))
        self.transcript.tag_configure("user", foreground=USER_COLOUR, spacing1=6)
        self.transcript.tag_configure("answer", foreground=ANSWER_COLOUR, spacing1=4)
        self.transcript.tag_configure("who", font=("TkDefaultFont", 11, "bold"))
        self.transcript.tag_configure("note", foreground="#888888")
        panes.add(self.transcript, weight=3)
        box = ttk.LabelFrame(panes, text="Reasoning", padding=4)
        self.reasoning = tk.Text(box, wrap="word", state="disabled", height=6, relief="flat", padx=6, pady=4,
                                 background=REASONING_BG, foreground=REASONING_COLOUR,
                                 font=("TkDefaultFont", 10, "italic"))
        self.reasoning.pack(fill="both", expand=True)
        panes.add(box, weight=1)

        bottom = ttk.Frame(root, padding=8)
        bottom.pack(fill="x")
        self.entry = ttk.Entry(bottom)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda e: self.send())
        self.send_button = ttk.Button(bottom, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = ttk.Button(bottom, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        ttk.Button(bottom, text="New chat", command=self.new_chat).pack(side="left", padx=(6, 0))
        self.status = ttk.Label(root, text="pick a model", padding=(8, 0, 8, 6), foreground="#555555")
        self.status.pack(fill="x")
        root.bind("<Escape>", lambda e: self.stop())
        root.protocol("WM_DELETE_WINDOW", self.quit)
        self._buttons()
        root.after(POLL_MS, self._drain)
        if models:
            self.picker.set(models[0])
            self.load(models[0])

    # --- UI thread: user actions ------------------------------------------------------------------------------

    def _picked(self, _event=None) -> None:
        choice = self.picker.get()
        if choice == OPEN:
            path = filedialog.askopenfilename(title="A deepseek4 GGUF", filetypes=[("GGUF", "*.gguf"), ("all", "*")])
            if not path:
                self.picker.set(self.model_path or "")
                return
            self.picker.configure(values=[*self.picker.cget("values")[:-1], path, OPEN])
            self.picker.set(path)
            choice = path
        if choice != self.model_path:
            self.load(choice)

    def load(self, path: str) -> None:
        """Load `path` on a worker thread; an answer still streaming is stopped first."""
        if self.cancel is not None:
            self.pending_load = path
            self.stop()
            return
        self.loading = path
        self.progress_calls, self.progress_last = 0, None
        self.bar.configure(value=0)
        self.status.configure(text=f"loading {os.path.basename(path)}")
        self._buttons()
        threading.Thread(target=self._load_worker, args=(path,), daemon=True, name="load").start()

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.model is None or self.cancel is not None or self.loading:
            return
        self.entry.delete(0, "end")
        self.messages.append({"role": "user", "content": text})
        self._write(self.transcript, "You: ", "user", "who")
        self._write(self.transcript, text + "\n", "user")
        self._write(self.transcript, "Assistant: ", "answer", "who")
        self._clear(self.reasoning)
        self.answer = {"reasoning": "", "content": ""}
        self.max_gap = 0.0
        self.cancel = threading.Event()
        self.status.configure(text="answering")
        self._buttons()
        threading.Thread(target=self._chat_worker, daemon=True, name="chat",
                         args=(self.model, list(self.messages), self.think.get(), self.cancel, self.cache)).start()

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.set()  # the worker ends between two tokens, with finish reason "cancelled"
            self.status.configure(text="stopping")

    def new_chat(self) -> None:
        if self.cancel is not None:
            self.stop()
            return
        self.messages = []
        self.cache = self.model.new_cache() if self.model is not None else None
        self._clear(self.transcript)
        self._clear(self.reasoning)

    def quit(self) -> None:
        self.stop()
        self.root.destroy()

    # --- worker threads: never touch a widget, only put events on the queue ---------------------------------

    def _load_worker(self, path: str) -> None:
        try:
            model = flashlite.load(path, progress=lambda f: self.queue.put(("progress", path, f)))
            model.tokenizer  # built here rather than on the first message
            self.queue.put(("loaded", path, model))
        except Exception as exc:  # noqa: BLE001 - shown in the window
            self.queue.put(("load-failed", path, f"{type(exc).__name__}: {exc}"))

    def _chat_worker(self, model, messages, think, cancel, cache) -> None:
        try:
            for piece in model.chat(messages, think=think, cancel=cancel, cache=cache, max_tokens=self.max_tokens,
                                    temperature=self.temperature):
                self.queue.put(("piece", piece))
                if self.delay:
                    time.sleep(self.delay)
        except Exception as exc:  # noqa: BLE001
            self.queue.put(("chat-failed", f"{type(exc).__name__}: {exc}"))

    # --- UI thread: events from the workers ------------------------------------------------------------------

    def _drain(self) -> None:
        now = time.monotonic()
        if self.cancel is not None or self.loading:
            self.max_gap = max(self.max_gap, now - self.last_drain)
        self.last_drain = now
        try:
            for _ in range(200):  # a bounded batch, so that a fast stream never starves the window's own events
                self._handle(*self.queue.get_nowait())
        except queue.Empty:
            pass
        self.root.after(POLL_MS, self._drain)

    def _handle(self, kind, *args) -> None:
        if kind == "progress":
            path, fraction = args
            if path == self.loading:
                self.bar.configure(value=100.0 * fraction)
                self.progress_calls += 1
                self.progress_last = fraction
        elif kind == "loaded":
            path, model = args
            if path != self.loading:  # superseded by a later pick
                model.close()
                return
            if self.model is not None:
                self.model.close()
            self.model, self.model_path, self.loading = model, path, None
            self.messages, self.cache = [], model.new_cache()
            self.status.configure(text=f"{os.path.basename(path)}: {model.args.n_layers} layers, "
                                       f"{model.vocab_size} tokens of vocabulary, context {model.ctx}")
            self._write(self.transcript, f"[{os.path.basename(path)} loaded]\n", "note")
            self.entry.focus_set()
            self._emit("loaded", model=path, progress_calls=self.progress_calls, progress_last=self.progress_last)
        elif kind == "load-failed":
            path, error = args
            if path == self.loading:
                self.loading = None
                self.status.configure(text=f"cannot load {os.path.basename(path)}")
                self._write(self.transcript, f"[{error}]\n", "note")
                self._emit("error", error=error)
        elif kind == "piece":
            piece, = args
            if not self.answer["content"] and not self.answer["reasoning"] and piece.text:
                self._emit("streaming")
            if piece.kind == "reasoning":
                self.answer["reasoning"] += piece.text
                self._write(self.reasoning, piece.text)
            elif piece.kind == "content":
                self.answer["content"] += piece.text
                self._write(self.transcript, piece.text, "answer")
            elif piece.kind == "tool_call":
                self._write(self.transcript, f"[tool call {json.dumps(piece.tool_call)}]", "note")
            elif piece.kind == "done":
                self._finished(piece.finish_reason, piece)
        elif kind == "chat-failed":
            error, = args
            self._write(self.transcript, f"[{error}]", "note")
            self._finished("error", None)

    def _finished(self, reason: str, piece) -> None:
        self._write(self.transcript, "\n" if reason != "cancelled" else " [stopped]\n", "note")
        if reason != "error":
            self.messages.append({"role": "assistant", "content": self.answer["content"],
                                  "reasoning_content": self.answer["reasoning"]})
        self.cancel = None
        tokens = f", {piece.completion_tokens} tokens" if piece is not None else ""
        self.status.configure(text=f"{reason}{tokens}")
        self._emit("answer", finish_reason=reason, content=self.answer["content"],
                   reasoning=self.answer["reasoning"], ui_max_gap_ms=round(1000 * self.max_gap))
        self._buttons()
        if self.pending_load:
            path, self.pending_load = self.pending_load, None
            self.load(path)

    # --- helpers ---------------------------------------------------------------------------------------------

    def _buttons(self) -> None:
        busy = self.cancel is not None
        ready = self.model is not None and not busy and not self.loading
        self.send_button.configure(state="normal" if ready else "disabled")
        self.stop_button.configure(state="normal" if busy else "disabled")

    @staticmethod
    def _write(widget: tk.Text, text: str, *tags: str) -> None:
        widget.configure(state="normal")
        widget.insert("end", text, tags)
        widget.configure(state="disabled")
        widget.see("end")

    @staticmethod
    def _clear(widget: tk.Text) -> None:
        widget.configure(state="normal")
        widget.delete("1.0", "end")
        widget.configure(state="disabled")

    def _emit(self, event: str, **fields) -> None:
        if self.echo:
            print(json.dumps({"event": event, **fields}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="GGUF files for the model picker (the first is loaded)")
    ap.add_argument("--think", choices=["none", "high", "max"], default="none", help="reasoning mode to start with")
    ap.add_argument("-n", "--max-tokens", type=int, default=512, help="longest answer, in tokens")
    ap.add_argument("--temp", type=float, default=0.6, help="sampling temperature")
    ap.add_argument("--events", action="store_true", help="print what happens as JSON lines on stdout")
    ap.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)  # seconds per token (tests)
    args = ap.parse_args(argv)
    root = tk.Tk()
    ChatWindow(root, args.models, think=args.think, max_tokens=args.max_tokens, temperature=args.temp,
               events=args.events, delay=args.delay)
    root.mainloop()


if __name__ == "__main__":
    main()
