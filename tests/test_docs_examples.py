"""Every command line the docs show is one the CLI accepts.

Each ``reid-export ...`` / ``reid-train ...`` line of a code block in README.md and docs/*.md, and
each example in a command's ``--help``, is parsed by the command itself (click's own parser, with
every option, choice and type check; ``--opts`` as the commands take it) without running it: a
renamed flag, a choice that no longer exists or a missing argument fails here, naming the page and
line. What the examples compute is the subject of the tests of each command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("reid-export", "reid-train")


def _commands_in_markdown(path: Path) -> list[tuple[str, str]]:
    """(where, command line) for every reid-export / reid-train line of the page's code blocks."""
    out, block, start, in_code, shell = [], [], 0, False, True
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if in_code and shell:
                out += _commands_in_block(block, f"{path.relative_to(REPO)}:{start}")
            in_code, block, start = not in_code, [], number
            shell = line[3:].strip() in ("", "bash", "sh", "console", "shell")  # not ```text, ```python, ```yaml
            continue
        if in_code:
            block.append(line)
    return out


def _commands_in_block(lines: list[str], where: str) -> list[tuple[str, str]]:
    """(where, command) for every reid-export / reid-train line of ``lines``, continuation lines joined."""
    joined, current = [], ""
    for line in lines:
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    out = []
    for text in joined:
        if text.startswith("$ "):
            text = text[2:]
        if text.startswith("torchrun ") and " --no-python reid-train" in text:  # the command torchrun starts
            text = "reid-train" + text.split(" --no-python reid-train", 1)[1]
        for program in PROGRAMS:
            if text.startswith(program + " ") or text == program:
                out.append((where, _strip_shell(text)))
    return out


def _strip_shell(text: str) -> str:
    """The command alone: no trailing comment, pipe, redirection or second command."""
    words = shlex.split(text, comments=True)
    for i, word in enumerate(words):
        if word in ("|", "&&", ";", ">", ">>", "2>", "||", "&"):
            words = words[:i]
            break
    return shlex.join(words)


def _help_examples() -> list[tuple[str, str]]:
    from reid_export.cli.main import cli
    from reid_train.cli import train_command

    out = []
    commands = [(f"reid-export {name}", cmd) for name, cmd in cli.commands.items()] + [("reid-train", train_command)]
    for label, cmd in commands:
        out += _commands_in_block((cmd.help or "").splitlines(), f"{label} --help")
    return out


EXAMPLES = [c for page in PAGES for c in _commands_in_markdown(page)] + _help_examples()


def test_the_docs_hold_examples_of_every_command():
    from reid_export.cli.main import cli

    shown = {shlex.split(line)[1] for _, line in EXAMPLES if line.startswith("reid-export ") and len(shlex.split(line)) > 1}
    missing = sorted(set(cli.commands) - shown)
    assert not missing, f"commands without an example in README.md/docs: {missing}"
    assert any(line.startswith("reid-train") for _, line in EXAMPLES)
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 300, f"README.md has {len(readme)} lines; the details belong in docs/"


@pytest.mark.parametrize("where,line", EXAMPLES, ids=[f"{w}:{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_example_parses(where, line):
    from reid_export.cli.main import cli
    from reid_train.cli import train_command

    words = shlex.split(line)
    if words[0] == "reid-train":
        command, args, name = train_command, words[1:], "reid-train"
    else:
        if len(words) < 2 or words[1] in ("-h", "--help", "--version"):
            return
        assert words[1] in cli.commands, f"{where}: `{line}`: no command {words[1]!r}"
        command, args, name = cli.commands[words[1]], words[2:], words[1]
    try:
        with command.make_context(name, list(args), resilient_parsing=False) as ctx:
            assert ctx.params is not None
    except click.exceptions.Exit:
        pass  # --help / --version in an example
    except click.UsageError as exc:
        pytest.fail(f"{where}: `{line}`: {exc.format_message()}")


def test_a_broken_example_is_caught():
    """The check can fail: an unknown flag and a bad choice are refused by the same parse."""
    from reid_export.cli.main import cli

    for bad in (["model.onnx", "-o", "x.onnx", "--precision", "int4"], ["model.onnx", "-o", "x.onnx", "--no-such"]):
        with pytest.raises(click.UsageError):
            cli.commands["quantize"].make_context("quantize", bad)
    assert re.search(r"reid-export quantize", " ".join(line for _, line in EXAMPLES))
