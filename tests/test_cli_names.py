"""Every command's options are spelled as llama.cpp spells the same option (common/arg.cpp for the runtime tools,
tools/quantize/quantize.cpp for llama-quantize), so that a llama.cpp command line carries over."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from flashlite.cli import main

# llama.cpp's spellings (every one of them) of the options flashlite's command has with the same meaning
LLAMA_CPP = {
    "run": [["-m", "--model"], ["-p", "--prompt"], ["-f", "--file"], ["-n", "--predict", "--n-predict"],
            ["-t", "--threads"],
            ["-c", "--ctx-size"], ["-hf", "-hfr", "--hf-repo"], ["-md", "--model-draft", "--spec-draft-model"],
            ["--spec-type"], ["--spec-draft-n-max"], ["-dev", "--device"]],
    "chat": [["-m", "--model"], ["-p", "--prompt"], ["-f", "--file"], ["-n", "--predict", "--n-predict"],
             ["-t", "--threads"], ["-c", "--ctx-size"], ["-sys", "--system-prompt"],
             ["-sysf", "--system-prompt-file"], ["-s", "--seed"], ["--temp", "--temperature"], ["--top-k"],
             ["--top-p"], ["--min-p"], ["-hf", "-hfr", "--hf-repo"], ["-dev", "--device"]],
    "serve": [["-m", "--model"], ["--host"], ["--port"], ["-t", "--threads"], ["-c", "--ctx-size"],
              ["-np", "--parallel"], ["--api-key"], ["-a", "--alias"], ["-to", "--timeout"],
              ["-hf", "-hfr", "--hf-repo"], ["-dev", "--device"]],
    "bench": [["-m", "--model"], ["-p", "--n-prompt"], ["-n", "--n-gen"], ["-pg"], ["-d", "--n-depth"],
              ["-t", "--threads"], ["-r", "--repetitions"], ["-o", "--output"], ["--no-warmup"],
              ["-dev", "--device"]],
    "perplexity": [["-m", "--model"], ["-f", "--file"], ["-c", "--ctx-size"], ["-b", "--batch-size"], ["--chunks"],
                   ["-t", "--threads"], ["-hf", "-hfr", "--hf-repo"]],
    "imatrix": [["-m", "--model"], ["-f", "--file"], ["-o", "--output"], ["-c", "--ctx-size"], ["--chunks"],
                ["-t", "--threads"], ["-hf", "-hfr", "--hf-repo"]],
    "quantize": [["--imatrix"], ["--include-weights"], ["--exclude-weights"], ["--output-tensor-type"],
                 ["--token-embedding-type"], ["--tensor-type"], ["--tensor-type-file"], ["--leave-output-tensor"],
                 ["--pure"], ["--allow-requantize"], ["--override-kv"], ["--dry-run"], ["--keep-split"]],
}


@pytest.mark.parametrize("command", sorted(LLAMA_CPP))
def test_options_carry_llama_cpps_names(command):
    params = main.commands[command].params
    for names in LLAMA_CPP[command]:
        owners = [p for p in params if set(names) & set(p.opts)]
        assert len(owners) == 1, f"{command}: no one option named {names}"
        missing = set(names) - set(owners[0].opts)
        assert not missing, f"{command}: {owners[0].opts} lacks llama.cpp's {sorted(missing)}"


def test_chat_takes_the_system_prompt_from_a_file(tmp_path):
    """-sys and -sysf are one option given two ways: both at once is refused before the model loads."""
    prompt = tmp_path / "system.txt"
    prompt.write_text("be brief")
    result = CliRunner().invoke(main, ["chat", "-m", str(tmp_path / "absent.gguf"), "-sys", "x", "-sysf", str(prompt)])
    assert result.exit_code == 2 and "at most one of -sys/--system-prompt and -sysf" in result.output


def test_run_reads_the_prompt_from_a_file_as_from_p(tiny_gguf, tmp_path):
    """-f FILE is -p with the file's text: the same greedy tokens."""
    gguf = str(tiny_gguf("--type", "q8_0"))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n    return")
    by_p = CliRunner().invoke(main, ["run", "-m", gguf, "-p", prompt.read_text(), "-n", "6"])
    by_f = CliRunner().invoke(main, ["run", "-m", gguf, "-f", str(prompt), "-n", "6"])
    assert by_p.exit_code == 0 and by_f.exit_code == 0, by_f.output
    assert by_f.stdout == by_p.stdout and by_p.stdout.strip()
    both = CliRunner().invoke(main, ["run", "-m", gguf, "-f", str(prompt), "-p", "x"])
    assert both.exit_code == 2 and "exactly one of -p/--prompt, -f/--file and --tokens" in both.output
