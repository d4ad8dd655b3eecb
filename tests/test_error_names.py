"""Library errors name parameters; the CLI shows them as flags.

A library message names the parameter of the Python call in backticks (```atol` and `rtol` go
together``); ``reid_export.console.run_cli`` rewrites each such name to the invoked command's flag
(``--atol``) in error lines, ``note:`` lines and the library's log lines. Tested here: the API's word,
the CLI's word for the same failure, the mapping itself, and a scan of the library's message strings
(every backticked name has a flag somewhere; no ``--flag`` is left where the API user would read it).
"""

from __future__ import annotations

import ast
import logging
import re
import warnings

import click
import pytest

from conftest import REPO, run_cli, write_image
from reid_export import api
from reid_export.console import (_BACKTICKED, OptsCommand, flag_aliases, flag_for, flag_names, invoked_commands,
                                 run_cli as console_run_cli, say, to_flags)
from reid_export.errors import ReidExportNote, UsageError


# --------------------------------------------------------------------------- the API and the CLI, one failure

def test_api_error_names_the_parameter(tmp_path):
    with pytest.raises(UsageError) as caught:
        api.parity(tmp_path / "ref.onnx", [tmp_path / "cand.onnx"], [tmp_path],
                   gate=api.Tolerances.by_precision(atol=1e-3))
    message = str(caught.value)
    assert "`rtol`" in message and "`atol`" in message
    assert "--" not in message


def test_cli_shows_the_same_failure_with_flags(tmp_path):
    image = write_image(tmp_path / "0001_c1s1_000001_00.jpg")
    result = run_cli("parity", tmp_path / "ref.onnx", tmp_path / "cand.onnx", "--images", image, "--atol", "1e-3")
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert lines == ["reid-export: error: --atol and --rtol go together; give both"], result.err


def test_cli_maps_a_quantize_option_error(tmp_path):
    """A QuantizeOptions field (``calib_dirs``) shown as the quantize flag (``--calib-dir``)."""
    result = run_cli("quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--precision", "int8")
    assert result.code == 2, result
    assert "--precision int8 needs real calibration images: --calib-dir DIR" in result.err, result.err
    assert "`" not in result.err
    with pytest.raises(UsageError, match="`precision` int8 needs real calibration images: `calib_dirs` DIR"):
        api.QuantizeOptions("int8").check()


# --------------------------------------------------------------------------- the mapping

@flag_aliases(num_workers="workers", **{"gates=EvalGates.off()": "no_gate"})
@click.command(cls=OptsCommand)
@click.argument("model", metavar="MODEL.onnx")
@click.argument("images", nargs=-1)
@click.option("-o", "--output", "out_dir")
@click.option("--workers", type=int, default=1)
@click.option("--no-gate", is_flag=True)
@click.option("--reduce-range/--no-reduce-range", default=None)
@click.option("--say", "what", default="")
@click.option("--atol", type=float)
@click.option("--calib-size", type=int)
def _probe(model, images, out_dir, workers, no_gate, reduce_range, what, atol, calib_size):
    """A command that does what the library does: says, notes, fails."""
    say(f"said: {what}")
    logging.getLogger("reid_export.sub").info(f"logged: {what}")
    warnings.warn(f"noted: {what}", ReidExportNote)
    raise UsageError(f"failed: {what}")


@click.group()
@click.option("--debug", is_flag=True)
@click.option("--level", default="x")
def _group(debug, level):
    pass


_group.add_command(_probe, "probe")


def test_flag_names_of_a_command():
    names = flag_names(invoked_commands(_group, ["--level", "probe", "probe", "m.onnx"]))
    assert names["debug"] == "--debug" and names["level"] == "--level"  # the group's own
    assert names["model"] == "MODEL.onnx" and names["images"] == "IMAGES"  # arguments: their metavar
    assert names["out_dir"] == "--output"  # the longest -- flag, not -o
    assert names["num_workers"] == "--workers" and names["gates=EvalGates.off()"] == "--no-gate"  # aliases
    assert names["reduce_range=True"] == "--reduce-range" and names["reduce_range=False"] == "--no-reduce-range"
    assert names["opts"] == "--opts"  # OptsCommand's trailing --opts
    # a value of a group option that looks like a command name is not the command
    assert invoked_commands(_group, ["--level", "probe"]) == [_group]
    assert invoked_commands(_group, ["--level", "x", "probe"]) == [_group, _probe]


@pytest.mark.parametrize("text, shown", [
    ("`atol` and `rtol` go together", "--atol and rtol go together"),  # rtol: not this command's
    ("`options.calib_size` must be >= 1", "--calib-size must be >= 1"),  # an attribute: its last part
    ("`num_workers` must be >= 1", "--workers must be >= 1"),             # an alias
    ("re-quantize with `reduce_range=True`", "re-quantize with --reduce-range"),
    ("`reduce_range=False` to choose", "--no-reduce-range to choose"),
    ("`gates=EvalGates.off()` reports without failing", "--no-gate reports without failing"),
    ("`half` applies to checkpoints", "half applies to checkpoints"),  # unknown: the bare name
    ("`model` not found", "MODEL.onnx not found"),
    ("`reid-export parity --locate` names", "`reid-export parity --locate` names"),  # a command line stays
])
def test_to_flags(text, shown):
    names = flag_names(invoked_commands(_group, ["probe", "m.onnx"]))
    assert to_flags(text, names) == shown


def test_to_flags_outside_the_cli_leaves_the_text():
    assert to_flags("`atol` and `rtol`") == "`atol` and `rtol`"


def test_errors_notes_and_log_lines_show_flags(capsys):
    with pytest.raises(SystemExit) as caught:
        console_run_cli(_group, ["probe", "m.onnx", "--say", "`num_workers` `reduce_range=False` `out_dir`"],
                        prog_name="probe")
    assert caught.value.code == 2
    err = capsys.readouterr().err.splitlines()
    shown = "--workers --no-reduce-range --output"
    assert f"said: {shown}" in err and f"logged: {shown}" in err, err
    assert f"probe: note: noted: {shown}" in err, err
    assert err[-1] == f"probe: error: failed: {shown}", err
    assert to_flags("`atol`") == "`atol`"  # the mapping ends with the run


# --------------------------------------------------------------------------- every command's flags

def _all_commands():
    from reid_export.cli.main import cli
    from reid_train.cli import train_command

    def walk(command, parents):
        chain = parents + [command]
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield from walk(sub, chain)
        else:
            yield chain

    yield from walk(cli, [])
    yield [train_command]


def _known_names() -> dict[str, str]:
    known: dict[str, str] = {}
    for chain in _all_commands():
        known.update(flag_names(chain))
    return known


def test_aliases_name_real_parameters():
    for chain in _all_commands():
        params = {p.name for c in chain for p in c.params}
        for library_name, param in getattr(chain[-1], "flag_aliases", {}).items():
            assert param in params, f"{chain[-1].name}: alias {library_name} -> {param}: no such parameter"


# --------------------------------------------------------------------------- the scan of the library's messages

MESSAGE_CALLS = {"warn", "note", "say", "log", "warning", "info", "error", "_note", "_warn"}
APPEND_TO = {"notes", "mine", "failures", "warnings", "problems"}
# command lines of another command (or program) may keep their flags
COMMAND_START = re.compile(r"\b(reid-export|reid-train|pip install|torchrun|tritonserver)\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# deliberate exceptions: (file, flag or name) -> why
ALLOWED = {
    ("reid_export/export/onnx_export.py", "--debug"):
        "the CLI's own switch for the traceback; an API caller has the chained exception already",
    ("trainer/distributed.py", "--nproc-per-node"): "torchrun's option, not one of ours",
    ("trainer/distributed.py", "--nnodes"): "torchrun's option, not one of ours",
    ("*", "half"): "a checkpoint in half precision is spelt MODEL@fp16 on the command line, not a flag",
}


def _is_message_call(node: ast.Call) -> bool:
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name.endswith(("Error", "Refused")) or name in MESSAGE_CALLS:
        return True
    return (name == "append" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id in APPEND_TO)


def _texts(node: ast.AST) -> list[str]:
    """The string literals under ``node``: an f-string as one text with ``{}`` for its values; lists and
    tuples of strings are argument vectors (``["quantize", model, "--precision", p]``), not prose."""
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)]
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else []
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return []
    return [text for child in ast.iter_child_nodes(node) for text in _texts(child)]


def message_texts(source: str) -> list[tuple[int, str]]:
    """(line, text) of every message string in a module: the arguments of raise/warn/note/say/log calls
    (and ``refusal`` assignments, gate failure lists), the strings assigned to names those use, and
    the returns of this module's functions they call."""
    tree = ast.parse(source)
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_message_call(node):
            roots += [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Attribute) and t.attr == "refusal"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            roots.append(node.value)
    used = {n.id for r in roots for n in ast.walk(r) if isinstance(n, ast.Name)}
    called = {n.func.id for r in roots for n in ast.walk(r) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in used for t in targets):
                roots.append(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name in called:
            roots += [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
    seen, out = set(), []
    for root in roots:
        for text in _texts(root):
            if (root.lineno, text) not in seen:
                seen.add((root.lineno, text))
                out.append((root.lineno, text))
    return out


def flags_outside_command_lines(text: str) -> list[str]:
    """The ``--flags`` of a message that are not part of a suggested command line (``reid-export
    quantize --precision fp16``: another command's own spelling)."""
    spans = []
    for start in COMMAND_START.finditer(text):
        end = start.end()
        for token in re.finditer(r"\S+", text[start.end():]):
            if token.group().startswith("("):
                break
            end = start.end() + token.end()
            if token.group().endswith((";", ")")):
                break
        spans.append((start.start(), end))
    return [m.group() for m in FLAG.finditer(text) if not any(a <= m.start() < b for a, b in spans)]


def problems_of(source: str, path: str, known: dict[str, str]) -> list[str]:
    problems = []
    for line, text in message_texts(source):
        for flag in flags_outside_command_lines(text):
            if (path, flag) not in ALLOWED:
                problems.append(f"{path}:{line}: {flag} in a library message: name the parameter in backticks")
        for match in _BACKTICKED.finditer(text):
            name = match.group(1)
            if flag_for(name, known) is None and ("*", name) not in ALLOWED and (path, name) not in ALLOWED:
                problems.append(f"{path}:{line}: `{name}` is no command's parameter (add a flag_aliases entry?)")
    return problems


def _library_files():
    for path in sorted([*(REPO / "reid_export").rglob("*.py"), *(REPO / "trainer").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if not rel.startswith("reid_export/cli/") and rel != "trainer/cli.py":
            yield rel, path


def test_library_messages_name_parameters():
    known = _known_names()
    problems = [p for rel, path in _library_files() for p in problems_of(path.read_text(), rel, known)]
    assert not problems, "\n".join(problems)


def test_the_scan_sees_messages_where_they_are_made():
    source = '''
FIX = "point --dataset-root at it"
def hint():
    return "try --config x.yml"
def f(n):
    if n:
        raise UsageError(f"--calib-size must be >= 1, got {n}; " + FIX)
    report.refusal = "not written; --allow-below-gate writes it"
    note(hint())
    warnings.warn("`no_such_parameter` is odd", ReidExportNote)
    log("see `reid-export parity --locate` and reid-export quantize --precision fp16 (or `calib_size`)")
    args = ["--not-a-message"]
'''
    known = _known_names()
    problems = problems_of(source, "planted.py", known)
    assert any("--calib-size" in p for p in problems), problems
    assert any("--dataset-root" in p for p in problems), problems      # a name the raise uses
    assert any("--config" in p for p in problems), problems            # a function the note calls
    assert any("--allow-below-gate" in p for p in problems), problems  # a refusal
    assert any("`no_such_parameter`" in p for p in problems), problems
    assert not any("--locate" in p or "--precision" in p or "calib_size" in p or "--not-a-message" in p
                   for p in problems), problems
    assert len(problems) == 5, problems
    fixed = source.replace("--calib-size", "`calib_size`").replace("--dataset-root", "`dataset_root`") \
        .replace("--config", "`config`").replace("--allow-below-gate", "`allow_below_gate`") \
        .replace("no_such_parameter", "max_float")
    assert problems_of(fixed, "planted.py", known) == []


def test_trainer_log_lines_show_flags(monkeypatch, capsys):
    """reid-train's own log lines (```resume```: no checkpoint ...) go through its console handler, which maps
    them while reid-train runs."""
    from reid_export import console
    from reid_train.cli import train_command
    from reid_train.engine import _TqdmHandler

    monkeypatch.setattr(console, "_FLAGS", flag_names([train_command]))
    record = logging.LogRecord("reid-train", logging.WARNING, __file__, 1,
                               "`resume`: no checkpoint; `eval_only` without weights; drop `config` x.yml", None, None)
    _TqdmHandler().emit(record)
    assert capsys.readouterr().err.strip() == "--resume: no checkpoint; --eval-only without weights; drop --config x.yml"
