"""examples/desktop_chat.py in a real X server: Xvfb runs the window, xdotool types into it as a person would, and
xwd takes screenshots whose pixels are checked (the answer drawn in the conversation, the reasoning in its own
pane). Skipped where Xvfb, xdotool or xwd is missing: on Debian, `apt-get install xvfb xdotool x11-apps`."""
from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashlite.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "desktop_chat.py"
SMALL = ROOT / "tests" / "fixtures" / "small_v4"
TOOLS = ("Xvfb", "xdotool", "xwd")

pytest.importorskip("tkinter", reason="Python without tkinter (Debian: apt-get install python3-tk)")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason="needs Xvfb, xdotool and xwd (apt-get install xvfb xdotool x11-apps)")

sys.path.insert(0, str(APP.parent))


def _colour(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def read_xwd(path: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an xwd screenshot (ZPixmap, 32 bits per pixel, as xwd writes on Xvfb)."""
    data = path.read_bytes()
    (header_size, version, fmt, _depth, width, height, _xoff, byte_order, _unit, _bit_order, _pad, bpp, bpl,
     _vclass, rmask, gmask, bmask, _bits, _entries, ncolors) = struct.unpack(">20I", data[:80])
    assert version == 7 and fmt == 2 and bpp == 32, (version, fmt, bpp)
    pixels = data[header_size + 12 * ncolors:]
    shifts = [m.bit_length() - 8 for m in (rmask, gmask, bmask)]
    rgb = bytearray(width * height * 3)
    order = "little" if byte_order == 0 else "big"
    for y in range(height):
        row = pixels[y * bpl:y * bpl + 4 * width]
        for x in range(width):
            v = int.from_bytes(row[4 * x:4 * x + 4], order)
            i = 3 * (y * width + x)
            rgb[i], rgb[i + 1], rgb[i + 2] = ((v & m) >> s for m, s in zip((rmask, gmask, bmask), shifts))
    return width, height, bytes(rgb)


def write_png(path: Path, width: int, height: int, rgb: bytes) -> None:
    raw = b"".join(b"\0" + rgb[3 * width * y:3 * width * (y + 1)] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class Screen:
    def __init__(self, width: int, height: int, rgb: bytes):
        self.width, self.height, self.rgb = width, height, rgb

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.rgb[i:i + 3])

    def rows_with(self, colour: tuple[int, int, int], near: int = 24) -> list[int]:
        """The rows holding pixels within `near` (per channel) of `colour`: where text of that colour is drawn."""
        out = []
        for y in range(self.height):
            row = self.rgb[3 * self.width * y:3 * self.width * (y + 1)]
            if any(all(abs(row[3 * x + c] - colour[c]) <= near for c in range(3)) for x in range(self.width)):
                out.append(y)
        return out

    def count(self, colour: tuple[int, int, int], rows: range | None = None) -> int:
        n = 0
        for y in rows or range(self.height):
            row = self.rgb[3 * self.width * y:3 * self.width * (y + 1)]
            n += sum(1 for x in range(self.width) if row[3 * x:3 * x + 3] == bytes(colour))
        return n


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("desktop") / "small_v4.gguf"
    result = CliRunner().invoke(main, ["quantize", str(SMALL), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def display():
    """A fresh Xvfb; its display number comes back through -displayfd."""
    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read) as fh:
            number = fh.readline().strip()
        assert number, "Xvfb did not start"
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


class App:
    """The example as a person runs it, with --events so that the test knows when the window has done something."""

    def __init__(self, display: str, *args: str):
        self.env = dict(os.environ, DISPLAY=display)
        self.proc = subprocess.Popen([sys.executable, str(APP), *args, "--events"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.env)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.window = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait(self, event: str, timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                got = self.events.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, self.proc.stderr.read()
                continue
            assert got["event"] != "error", got
            if got["event"] == event:
                return got
        raise AssertionError(f"no {event!r} event in {timeout} s")

    def x(self, *args: str) -> str:
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    def focus(self) -> None:
        self.window = self.x("search", "--sync", "--name", "^flashlite chat$").split()[0]
        self.x("windowfocus", "--sync", self.window)

    def type(self, text: str) -> None:
        self.x("type", "--delay", "15", text)
        self.x("key", "Return")

    def screenshot(self, path: Path) -> Screen:
        subprocess.run(["xwd", "-silent", "-id", self.window, "-out", str(path)], env=self.env, check=True,
                       timeout=30)
        shot = Screen(*read_xwd(path))
        write_png(path.with_suffix(".png"), shot.width, shot.height, shot.rgb)  # left for a person to look at
        return shot

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_a_message_typed_into_the_window_is_answered_with_its_reasoning_apart(display, small_gguf, tmp_path):
    import desktop_chat as ui

    app = App(display, str(small_gguf), "--think", "high", "-n", "48", "--temp", "0", "--delay", "0.02")
    try:
        loaded = app.wait("loaded")
        assert loaded["progress_calls"] >= 3 and loaded["progress_last"] == 1.0  # the bar moved, and finished
        app.focus()
        before = app.screenshot(tmp_path / "before.xwd")
        app.type("Hello! Who are you?")
        answer = app.wait("answer")
        assert answer["finish_reason"] in ("stop", "length")
        assert answer["content"].strip() and answer["reasoning"].strip()
        # the worker streamed while the UI thread kept reading its queue every few milliseconds
        assert answer["ui_max_gap_ms"] < 1000, answer
        time.sleep(0.3)  # let Tk draw the last piece
        after = app.screenshot(tmp_path / "after.xwd")

        # the conversation: the user's line (its own colour) and, below it, the answer's text, none before
        user_rows = after.rows_with(_colour(ui.USER_COLOUR), near=8)
        assert user_rows and not before.rows_with(_colour(ui.USER_COLOUR), near=8)
        below = range(max(user_rows) + 1, max(user_rows) + 80)
        assert after.count(_colour(ui.ANSWER_COLOUR), below) > 150 > before.count(_colour(ui.ANSWER_COLOUR), below)
        # the reasoning: its own pane (its background) with text of its colour, empty before
        bg = _colour(ui.REASONING_BG)
        pane = [y for y in range(after.height) if after.count(bg, range(y, y + 1)) > after.width // 2]
        assert len(pane) > 60, "no reasoning pane"
        assert min(pane) > max(user_rows)  # apart, below the conversation
        colour = _colour(ui.REASONING_COLOUR)
        assert after.count(colour, range(min(pane), max(pane) + 1)) > 100
        assert before.count(colour, range(min(pane), max(pane) + 1)) == 0

        # Stop (Escape) ends the next answer where it is
        app.type("What does the json module do?")
        app.wait("streaming")
        app.x("key", "Escape")
        stopped = app.wait("answer")
        assert stopped["finish_reason"] == "cancelled", stopped
    finally:
        app.close()
