"""`flashlite chat` driven as a real terminal program through a pseudo-terminal."""
import json
import os
import subprocess
import sys

import pexpect
import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_v4")
SPEED = (r"\[prefill \d+ tokens \(\d+ cached\) in [\d.]+ s, [\d.-]+ tok/s \| "
         r"decode \d+ tokens in [\d.]+ s, [\d.-]+ tok/s\]")
PROMPT = "> "


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "tiny.gguf")
    subprocess.run([sys.executable, "-m", "flashlite.cli", "quantize", FIXTURE, path, "--type", "q8_0", "--force"],
                   check=True, capture_output=True)
    return path


def spawn(gguf, *extra):
    child = pexpect.spawn(sys.executable, ["-m", "flashlite.cli", "chat", "-m", gguf, "--seed", "1", *extra],
                          encoding="utf-8", timeout=20, dimensions=(24, 200))
    child.expect_exact(PROMPT)
    return child


def ask(child, text):
    child.sendline(text)
    child.expect(SPEED)
    child.expect_exact(PROMPT)


def exit_ok(child):
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_answer_then_think_max_and_ctrl_d(gguf):
    child = spawn(gguf, "-n", "8")
    ask(child, "hello")
    child.sendline("/think max")
    child.expect_exact("think: max")
    child.expect_exact(PROMPT)
    child.sendline("why?")
    child.expect_exact("\x1b[2m")  # reasoning is shown dim on a terminal
    child.expect(SPEED)
    child.expect_exact(PROMPT)
    child.sendline("/think sideways")
    child.expect_exact("/think takes one of none, high, max")
    exit_ok(child)


def test_save_reset_load_keeps_history(gguf, tmp_path):
    saved = tmp_path / "conv.json"
    child = spawn(gguf, "-n", "8", "-sys", "be brief")
    ask(child, "first question")
    child.sendline("line one\\")
    child.expect_exact("... ")
    child.sendline("line two")
    child.expect(SPEED)
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.sendline("block a")
    child.sendline("block b")
    child.sendline('"""')
    child.expect(SPEED)
    child.expect_exact(PROMPT)
    child.sendline(f"/save {saved}")
    child.expect(r"saved 7 messages to \S+ \((\d+) cached tokens")
    cached_at_save = int(child.match.group(1))
    child.expect_exact(PROMPT)
    history = json.loads(saved.read_text())
    assert [m["role"] for m in history] == ["system"] + ["user", "assistant"] * 3
    assert [m["content"] for m in history if m["role"] != "assistant"] == [
        "be brief", "first question", "line one\nline two", "block a\nblock b"]
    assert all(isinstance(m["content"], str) for m in history)

    child.sendline("/reset")
    child.expect_exact("conversation reset")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {tmp_path / 'empty.json'}")
    child.expect_exact("saved 1 messages")
    child.sendline(f"/load {saved}")
    child.expect(r"loaded 7 messages from \S+, (\d+) cached tokens")
    assert int(child.match.group(1)) == cached_at_save > 20
    child.expect_exact(PROMPT)
    child.sendline(f"/save {tmp_path / 'again.json'}")
    child.expect_exact("saved 7 messages")
    child.expect_exact(PROMPT)
    assert json.loads((tmp_path / "again.json").read_text()) == history
    # the loaded history goes into the next prompt, and the loaded cache spares most of its prefill
    child.sendline("next")
    child.expect(r"\[prefill (\d+) tokens \((\d+) cached\)")
    fed, cached = int(child.match.group(1)), int(child.match.group(2))
    assert cached > 20 and fed < cached
    child.expect_exact(PROMPT)

    (tmp_path / "bad.json").write_text('{"role": "user"')
    child.sendline(f"/load {tmp_path / 'bad.json'}")
    child.expect_exact("not JSON")
    child.expect_exact(PROMPT)
    (tmp_path / "shape.json").write_text('[{"role": "robot", "content": "x"}]')
    child.sendline(f"/load {tmp_path / 'shape.json'}")
    child.expect_exact("message 0 is not")
    child.expect_exact(PROMPT)
    child.sendline(f"/load {tmp_path / 'missing.json'}")
    child.expect_exact("No such file")
    child.expect_exact(PROMPT)
    assert "Traceback" not in child.before
    exit_ok(child)


def test_ctrl_c_stops_an_answer_then_chat_goes_on(gguf):
    child = spawn(gguf, "-n", "2000", "-c", "1024")
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story")  # the echo: the answer starts after it
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(r"decode (\d+) tokens")
    assert int(child.match.group(1)) < 900
    child.expect_exact(PROMPT)
    child.sendline("and now?")
    child.expect(SPEED)
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_without_a_terminal(gguf):
    out = subprocess.run([sys.executable, "-m", "flashlite.cli", "chat", "-m", gguf, "-n", "8", "--seed", "1",
                          "--think", "high", "-p", "hello"], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<think>\n")  # reasoning stays apart as plain text on a pipe
    assert "\x1b" not in out.stdout
    assert PROMPT not in out.stdout
    assert len([line for line in out.stderr.splitlines() if line.startswith("[prefill ")]) == 1


def test_prompt_file_and_bad_model(gguf, tmp_path):
    first = tmp_path / "first.txt"
    first.write_text("from a file")
    out = subprocess.run([sys.executable, "-m", "flashlite.cli", "chat", "-m", gguf, "-n", "4", "-f", str(first)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "[prefill " in out.stderr
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"nope")
    out = subprocess.run([sys.executable, "-m", "flashlite.cli", "chat", "-m", str(bad), "-p", "x"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
