"""Every command line the docs show is one the CLI accepts, and runs; so does every Python example.

The examples: each ``reid-export ...`` / ``reid-train ...`` line of a code block in README.md and
docs/*.md, each example in a command's ``--help``, and each ```python block of those pages
(``test_python_example_runs``: run in the same world, its own asserts included, with the rows of
``PYTHON_SUBSTITUTIONS``; fast-reid's own code is tests/test_fastreid_client.py's).

*Parsed* (``test_example_parses``, in the fast subset): by the command itself (click's own parser,
with every option, choice and type check; ``--opts`` as the commands take it): a renamed flag, a
choice that no longer exists or a missing argument fails here, naming the page and line.

*Run* (``test_example_runs``, slow), as the failure table's cases are: in-process, in a *world*
folder that holds small files under the names the examples use (``World``: random-weight BoT
checkpoints with the numerics of trained ones, synthetic Market-1501-layout sets written by
``reid-export synth``, small foreign ONNX graphs, the repository's ``configs/``, links to the released
models of ``../shared/models``). An example whose input another example writes (``-o model.onnx``)
gets it from that example, run first in the world and once (its own test reuses the run); every other
example runs in a folder of its own that links the world's files, so that examples writing the same
name do not meet (``reid-train`` examples share the world: train, resume and evaluate one run). Each
must exit 0, or the code of a ``# exit N`` comment on its line (an example that shows a refusal), and
write every output it names: the file or folder exists, a ``.json`` parses, a ``.png`` is a PNG, a
``.npy`` loads.

The example's flags run as written, except for the rows of ``SUBSTITUTIONS`` (one table, each row
with its reason: sizes that would take minutes on two cores, and the INT8 gate for the random-weight
model). Examples that cannot run here are
skipped by the rules of ``skip_reason`` (TensorRT and CUDA, the demo's minutes of training, elided
arguments, released models or real data that are not present), each with its reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import CONFIGS, DATA, REPO, run_main

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCUMENTED_EXIT: dict[tuple[str, str], int] = {}  # (where, line) -> the exit code a `# exit N` comment gives
PROGRAMS = ("reid-export", "reid-train")
MODELS = Path(os.environ.get("REID_MODELS", REPO.parent / "shared" / "models"))


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
                line = _strip_shell(text)
                out.append((where, line))
                documented = re.search(r"#\s*exit (\d+)\b", text)
                if documented:  # an example that shows a refusal says so: `# exit 1: ...`
                    DOCUMENTED_EXIT[(where, line)] = int(documented.group(1))
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
IDS = [f"{w}:{i}" for i, (w, _) in enumerate(EXAMPLES)]


def _command(words: list[str]):
    """(click command, its arguments, its name) of an example's words."""
    from reid_export.cli.main import cli
    from reid_train.cli import train_command

    if words[0] == "reid-train":
        return train_command, words[1:], "reid-train"
    return cli.commands[words[1]], words[2:], words[1]


def test_the_docs_hold_examples_of_every_command():
    from reid_export.cli.main import cli

    shown = {shlex.split(line)[1] for _, line in EXAMPLES if line.startswith("reid-export ") and len(shlex.split(line)) > 1}
    missing = sorted(set(cli.commands) - shown)
    assert not missing, f"commands without an example in README.md/docs: {missing}"
    assert any(line.startswith("reid-train") for _, line in EXAMPLES)
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 300, f"README.md has {len(readme)} lines; the details belong in docs/"


@pytest.mark.parametrize("where,line", EXAMPLES, ids=IDS)
def test_example_parses(where, line):
    from reid_export.cli.main import cli

    words = shlex.split(line)
    if words[0] != "reid-train":
        if len(words) < 2 or words[1] in ("-h", "--help", "--version"):
            return
        assert words[1] in cli.commands, f"{where}: `{line}`: no command {words[1]!r}"
    command, args, name = _command(words)
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


# ---- running the examples -------------------------------------------------------------------------

@dataclass(frozen=True)
class Sub:
    """Replace the words ``old`` by ``new`` wherever they stand in an example (``prefix``: a word
    starting with ``old``), unless the example holds one of the words of ``unless``; with ``when``,
    only in examples that hold all of its words, with ``naming`` only in those with a word containing it."""
    old: str
    new: str
    why: str
    prefix: bool = False
    unless: tuple = ()
    when: tuple = ()
    naming: str = ""

    def apply(self, words: list[str]) -> list[str]:
        new = self.new.format(data=DATA, models=MODELS)
        if (any(w in self.unless for w in words) or not all(w in words for w in self.when)
                or not any(self.naming in w for w in words)):
            return words
        if self.prefix:
            return [new + w[len(self.old):] if w.startswith(self.old) else w for w in words]
        old, repl = self.old.split(), new.split()
        out, i = [], 0
        while i < len(words):
            if words[i:i + len(old)] == old:
                out += repl
                i += len(old)
            else:
                out.append(words[i])
                i += 1
        return out


SMALL = "small"  # the world's folder of shrunk configs: each the shipped file as _BASE_ plus the keys below
SMALL_CONFIGS = {
    "bagtricks_R50.yml": ("configs/Market1501/bagtricks_R50.yml",
                          "MODEL:\n  BACKBONE:\n    DEPTH: 18x\nINPUT:\n  SIZE_TRAIN: [64, 32]\n  SIZE_TEST: [64, 32]\n"),
    "bagtricks_R18_cpu.yml": ("configs/CUHK03/bagtricks_R18_cpu.yml", ""),
    "bagtricks_osnet_x0_25_market_ft_cpu.yml": ("configs/CUHK03/bagtricks_osnet_x0_25_market_ft_cpu.yml", ""),
}
# A training run of seconds: 32x16, batches of 4 identities x 4, one epoch, evaluated and saved at its end.
TINY_TRAINING = ("INPUT:\n  SIZE_TRAIN: [32, 16]\n  SIZE_TEST: [32, 16]\n  PADDING:\n    SIZE: 2\n"
                 "DATALOADER:\n  NUM_INSTANCE: 4\n  NUM_WORKERS: 0\n"
                 "SOLVER:\n  IMS_PER_BATCH: 16\n  MAX_EPOCH: 1\n  WARMUP_ITERS: 2\n  STEPS: [1]\n  CHECKPOINT_PERIOD: 1\n"
                 "TEST:\n  EVAL_PERIOD: 1\n  IMS_PER_BATCH: 64\n")

INT8_GATE = ("the INT8 graphs of the world's random-weight model move the pairwise similarities by 0.02-0.05 "
             "(measured), around the 0.03 that trained models are held to: the gate is the subject of "
             "tests/test_quantize_int8_search.py, not of the examples")

# What runs otherwise than written, and why. Every other flag of every example runs as written.
SUBSTITUTIONS = [
    Sub("configs/Market1501/bagtricks_R50.yml", f"{SMALL}/bagtricks_R50.yml",
        "a ResNet-50 at 256x128 (2.1x the weights and 16x the pixels): the shipped file as _BASE_ with DEPTH "
        "18x at 64x32"),
    Sub("configs/CUHK03/bagtricks_R18_cpu.yml", f"{SMALL}/bagtricks_R18_cpu.yml",
        "40 epochs of 2,426 crops: the shipped file as _BASE_ with one epoch at 32x16 (TINY_TRAINING)"),
    Sub("configs/CUHK03/bagtricks_osnet_x0_25_market_ft_cpu.yml", f"{SMALL}/bagtricks_osnet_x0_25_market_ft_cpu.yml",
        "5 epochs of 2.3 minutes (its config): the shipped file as _BASE_ with one epoch at 32x16 (TINY_TRAINING)"),
    Sub("DATASETS.ROOT ../shared/data", "DATASETS.ROOT datasets",
        "an epoch of CUHK03's 2,426 training crops takes minutes: the world's datasets/cuhk03-labeled, 8 "
        "synthetic identities"),
    Sub("model.pth", "model-ibn.pth", "the example shows a fast-reid checkpoint of an IBN net trained with cfg.yml "
        "plus that override; the world's model.pth is the BoT-R18 of the other examples", when=("MODEL.BACKBONE.WITH_IBN",)),
    Sub("--calib-dir ../shared/data/cuhk03-labeled/Market-1501-v15.09.15/bounding_box_train",
        "--calib-dir ../shared/data/cuhk03-labeled/Market-1501-v15.09.15/bounding_box_train --calib-size 64 --val-size 32",
        "512 calibration and 128 held-out real crops: 40 s on two shared cores"),
    Sub("quantize", "quantize --max-pair-error 0.1", INT8_GATE, naming="int8"),
    Sub("parity", "parity --max-pair-error 0.1", INT8_GATE, naming="int8"),
    Sub("eval", "eval --max-pair-error 0.1", INT8_GATE, naming="int8"),
    Sub("../shared/data/", "{data}/", "the real data where $REID_DATA says (skipped when it is not there)", prefix=True),
    Sub("../shared/models/", "{models}/", "the released models where $REID_MODELS says (skipped when not there)",
        prefix=True),
    Sub("bench", "bench --warmup 0.05 --duration 0.2",
        "bench's defaults time each model 1 s warm-up + 3 s per batch size", unless=("--duration", "--iterations")),
    Sub("--duration 10", "--duration 0.2 --warmup 0.05", "10 s per model and batch size"),
    Sub("--iterations 200", "--iterations 5 --warmup 0.05", "200 timed calls per batch size, with decoding"),
    Sub("--max-queries 60", "--max-queries 6", "--detect runs the model nine times over the queries' identities "
        "and their gallery images: 126-285 s for 60 queries (docs/export.md)"),
    Sub("--detect", "--max-queries 6 --detect", "as above (the default is 100 queries)", unless=("--max-queries",)),
    Sub("--identities 400", "--identities 8", "400 identities at 256x128 are ~4,000 images (100 at 128x64: 943)"),
    Sub("--nlist 1024", "--nlist 8", "IVF with 1,024 lists wants ~40,000 training vectors; the world's g.npy and "
        "d.npy hold 54"),
    Sub("--nprobe 64", "--nprobe 8", "no more lists to probe than there are (--nlist above)"),
]

SHARED_MODELS = {  # world name -> file in ../shared/models
    "osnet_x0_25_market1501.pt": "torchreid_osnet_x0_25_market1501.pt",
    "osnet_x0_5_msmt17.onnx": "osnet_x0_5_msmt17_combineall.onnx",
    "person-reidentification-retail-0288.FP32.xml": "person-reidentification-retail-0288.FP32.xml",
    "person-reidentification-retail-0288.FP32.bin": "person-reidentification-retail-0288.FP32.bin",
    "person-reidentification-retail-0288.xml": "person-reidentification-retail-0288.FP32.xml",
    "person-reidentification-retail-0288.bin": "person-reidentification-retail-0288.FP32.bin",
}

DEMO_REASON = ("the demo trains a model for minutes: `reid-export demo --quick` runs in .ci/run, and every stage "
               "of it at a tiny size in tests/test_demo.py")


def skip_reason(words: list[str]) -> str | None:
    """Why an example (as written) cannot run here, or None."""
    import torch

    if words[:2] == ["reid-export", "demo"]:
        return DEMO_REASON
    if "..." in words:
        return "an elided argument (...): not a whole command line"
    devices = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--device"]
    if (words[1:2] == ["trt"] or any(w.split("@")[0].endswith((".engine", ".plan")) for w in words)
            or any(d.startswith("tensorrt") for d in devices)):
        return "needs TensorRT and a CUDA GPU (tests/test_trt.py runs TensorRT where it is installed)"
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    for word in words:
        name = word.split("@")[0]
        if name in SHARED_MODELS and not (MODELS / SHARED_MODELS[name]).exists():
            return f"needs the released model {MODELS / SHARED_MODELS[name]} (set REID_MODELS to its folder)"
        if name.startswith("../shared/data/"):
            path = DATA / name[len("../shared/data/"):]
            if not path.exists():
                return f"real data {path} not present (set REID_DATA to the folder holding it)"
    return None


def expected_code(where: str, line: str) -> int:
    """The exit code an example must end with: 0, except where it shows a documented refusal (its
    ``# exit N`` comment, or a rule below)."""
    from reid_export.cpuinfo import has_bf16

    words = shlex.split(line)
    if (where, line) in DOCUMENTED_EXIT:
        return DOCUMENTED_EXIT[(where, line)]
    if any(w.endswith(":bf16") for w in words) and not has_bf16():
        return 2  # docs/export.md: bf16 "is refused with one line (exit 2) on a CPU without AVX512_BF16 or AMX-BF16"
    return 0


def substituted(words: list[str]) -> list[str]:
    for sub in SUBSTITUTIONS:
        words = sub.apply(words)
    return words


# The click parameters that name what a command writes.
OUTPUT_PARAMS = ("output", "repo", "out_dir", "report", "report_path", "csv_path", "plot", "plots", "ranklist",
                 "timing_cache", "directory", "workdir", "folder")


def _norm(path) -> str:
    return os.path.normpath(str(path))


def _params(words: list[str]) -> tuple[dict, list[str]]:
    command, args, name = _command(words)
    with command.make_context(name, list(args), resilient_parsing=False) as ctx:
        return dict(ctx.params), list(ctx.meta.get("opts", []))


def outputs_of(words: list[str], home: Path) -> tuple[list[str], list[str]]:
    """(paths the example writes, paths it updates in place), relative to the folder it runs in."""
    params, opts = _params(words)
    if words[0] == "reid-train":
        from reid_export.config import load_config

        with _cwd(home):
            cfg = load_config(params["config_file"], opts)
        return [_norm(params["output_dir"] or cfg.OUTPUT_DIR)], []
    written = [_norm(params[p]) for p in OUTPUT_PARAMS if params.get(p) is not None]
    if words[1] == "index" and params.get("add"):
        return [], written
    return written, []


def _inputs(words: list[str], outputs) -> list[str]:
    """The words of an example that may name a file (a model's ``@route`` left out), but not its outputs."""
    found = []
    for word in words[2 if words[0] == "reid-export" else 1:]:
        if word.startswith("-") or os.path.isabs(word):
            continue
        name = _norm(word.split("@")[0])
        if name not in outputs and name not in found and name != ".":
            found.append(name)
    return found


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class Run:
    words: list[str]
    folder: Path
    code: int
    out: str
    err: str
    outputs: list[str] = field(default_factory=list)

    def problems(self, expected: int) -> list[str]:
        """What is wrong with the run: another exit code, a named output missing or unreadable."""
        if self.code != expected:
            lines = [line for line in (self.out + "\n" + self.err).splitlines() if line.strip()]
            said = [line for line in lines if line.startswith("FAIL") or "error:" in line] or lines[-1:]
            return [f"exit {self.code}, expected {expected}: " + " / ".join(said)]
        found = []
        for name in self.outputs:
            path = self.folder / name
            if not path.exists():
                found.append(f"{name}: named as an output but not written")
            elif path.is_dir():
                if not any(path.iterdir()):
                    found.append(f"{name}: an empty folder")
            elif path.suffix == ".json":
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except ValueError as exc:
                    found.append(f"{name}: not JSON ({exc})")
            elif path.suffix == ".png" and path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
                found.append(f"{name}: not a PNG")
            elif path.suffix == ".npy":
                try:
                    np.load(path, allow_pickle=False)
                except (ValueError, OSError) as exc:
                    found.append(f"{name}: not a .npy array ({exc})")
            elif path.stat().st_size == 0:
                found.append(f"{name}: empty")
        return found


def _alias(target: str):
    def build(world: "World", name: str) -> None:
        world.ensure(target)
        (world.home / name).symlink_to(target)
    return build


def _features(images: str):
    """An extract output (``.npy`` and its ``.json``) of model.onnx on ``images``."""
    def build(world: "World", name: str) -> None:
        world.ensure("model.onnx")
        run = world.execute(["reid-export", "extract", "model.onnx", images, "-o", name, "--no-progress"], world.home)
        assert run.code == 0, run.err
    return build


# World files made when an example first needs them (another example makes them first).
DERIVED = {
    "model.int8-trt.onnx": _alias("model.int8.onnx"),   # quantize's default target is TensorRT's Q/DQ
    "q.npy": _features("query"),
    "g.npy": _features("crops"),
    "d.npy": _features("distractors_500k"),
}
# Files inside a folder that several examples write: which example writes this one.
PRODUCED_BY = {
    "boxmot/osnet_x0_25_market1501.onnx":
        "reid-export boxmot osnet_x0_25_market1501.pt --config configs/torchreid/osnet_x0_25.yml -o boxmot/",
}


class World:
    """The folder the examples run in: their inputs under the names they use, built once."""

    def __init__(self, root: Path):
        self.home = root / "world"
        self.runs = root / "runs"
        self.home.mkdir()
        self.runs.mkdir()
        self.done: dict[tuple, Run] = {}
        self.checked: dict[tuple, list[str]] = {}  # (words, expected exit) -> what was wrong
        self.failed = False
        self.examples = []  # every example's words as they run
        self.skipped: dict[tuple, str] = {}  # ... and why some cannot run here
        for _, line in EXAMPLES:
            words = shlex.split(line)
            if len(words) < 2 and words[0] == "reid-export":
                continue
            self.examples.append(substituted(words))
            if skip_reason(words):
                self.skipped[tuple(self.examples[-1])] = skip_reason(words)
        self._producers = None
        self._outputs: dict[tuple, tuple] = {}

    # -- building --------------------------------------------------------------------------------------
    def build(self) -> None:
        import torch

        from reid_export.checkpoint import save_checkpoint
        from reid_export.config import load_config
        from reid_export.data_config import DataConfig, data_config_from_cfg
        from reid_export.modeling import build_model
        from reid_export.modeling.random_weights import randomize_bn
        from reid_export.preprocess import preprocess
        from conftest import SmallReidNet, export_small_onnx

        home = self.home
        (home / "configs").symlink_to(CONFIGS)
        (home / SMALL).mkdir()
        for name, (base, keys) in SMALL_CONFIGS.items():
            if "R18_cpu" in name or "osnet" in name:
                keys += TINY_TRAINING
            (home / SMALL / name).write_text(f"_BASE_: {REPO / base}\n{keys}", encoding="utf-8")
        (home / "cfg.yml").write_text(f"_BASE_: {SMALL}/bagtricks_R18_cpu.yml\nOUTPUT_DIR: logs/x\n", encoding="utf-8")
        for name, target in SHARED_MODELS.items():
            if (MODELS / target).exists():
                (home / name).symlink_to(MODELS / target)

        # Data. The README's synth example makes data/ (50 identities); the Market-1501 names of the other
        # examples are a smaller synthetic set (16 identities), and the loose crops come from it.
        self.run_example(["reid-export", "synth", "data/", "--identities", "50"], in_world=True)
        self.synth("sets/market", "--identities", "16")
        self.synth("datasets/cuhk03-labeled", "--identities", "8", "--cameras", "2", "--size", "64", "32",
                   "--distractors", "2", "--junk", "1")  # reid-train's default DATASETS.ROOT is datasets/
        market = home / "sets" / "market" / "Market-1501-v15.09.15"
        for name in ("Market-1501-v15.09.15", "Market-1501", "cuhk03", "data/market1501"):
            (home / name).symlink_to(market)
        (home / "query").symlink_to(market / "query")
        (home / "bounding_box_train").symlink_to(market / "bounding_box_train")  # the Python examples' calib_dirs
        gallery = sorted(p for p in (market / "bounding_box_test").iterdir() if not p.name.startswith(("0000", "-1")))
        for folder, files in (("crops", gallery[:24]), ("new_crops", gallery[24:28]), ("more_crops", gallery[28:32]),
                              ("distractors_500k", sorted((market / "bounding_box_test").glob("0000_*")))):
            (home / folder).mkdir()
            for f in files:
                shutil.copy(f, home / folder / f.name)
        queries = sorted((market / "query").iterdir())
        for name, src in (("query.jpg", queries[0]), ("a.jpg", queries[0]), ("b.jpg", queries[1])):
            shutil.copy(src, home / name)

        # Checkpoints: a BoT-R18 at 64x32 with the numerics of a trained one, its BatchNorm statistics
        # measured on the training crops (its INT8 graphs keep the reduced-precision gate).
        cfg = load_config(home / SMALL / "bagtricks_R50.yml")
        crops = sorted((market / "bounding_box_train").iterdir())[:32]
        batch = torch.from_numpy(preprocess(crops, DataConfig(height=64, width=32)))
        torch.manual_seed(0)
        model = randomize_bn(build_model(cfg), branch_gain=0.15, inputs=[batch])
        save_checkpoint(home / "model_final.pth", model, cfg, data_config_from_cfg(cfg, model.feat_dim, "model_final"))
        for name in ("model.pth", "model_best.pth", "logs/market1501/bagtricks_R50/model_final.pth",
                     "logs/x/model_best.pth"):
            (home / name).parent.mkdir(parents=True, exist_ok=True)
            (home / name).symlink_to(home / "model_final.pth")
        # fast-reid's layout (no config inside), trained with cfg.yml plus --opts MODEL.BACKBONE.WITH_IBN True
        cfg = load_config(home / "cfg.yml", ["MODEL.BACKBONE.WITH_IBN", "True"])
        torch.manual_seed(1)
        torch.save({"model": randomize_bn(build_model(cfg), size=(32, 16)).state_dict()}, home / "model-ibn.pth")

        # ONNX graphs from elsewhere, without a data config: torchreid-style (normalised input) and
        # fast-reid-style (0..255 RGB, normalisation inside)
        torch.manual_seed(0)
        imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        export_small_onnx(SmallReidNet(), home / "vendor.onnx", torch.randn(8, 3, 64, 32))
        export_small_onnx(SmallReidNet(), home / "osnet_x1_0.onnx", torch.randn(8, 3, 256, 128), size=(256, 128))
        export_small_onnx(SmallReidNet([m * 255 for m in imagenet[0]], [s * 255 for s in imagenet[1]]),
                          home / "fastreid.onnx", torch.rand(8, 3, 64, 32) * 255)

    def outputs(self, words: list[str]) -> tuple[list[str], list[str]]:
        key = tuple(words)
        if key not in self._outputs:
            try:
                self._outputs[key] = outputs_of(words, self.home)
            except Exception:  # noqa: BLE001 - an example skipped as incomplete (`--opts ...`) names none
                if key not in self.skipped:
                    raise
                self._outputs[key] = ([], [])
        return self._outputs[key]

    def synth(self, folder: str, *args: str) -> None:
        run = self.execute(["reid-export", "synth", folder, *args, "--no-progress"], self.home)
        assert run.code == 0, run.err

    # -- running -------------------------------------------------------------------------------------
    def execute(self, words: list[str], folder: Path) -> Run:
        """Run one command line in-process in ``folder``."""
        from reid_export.cli.main import main
        from reid_train.cli import main as train_main

        with _cwd(folder):
            result = run_main(train_main if words[0] == "reid-train" else main, words[1:])
        _stop_ray()  # its workers live in the folder Ray started in, and a run's own folder is removed once it passed
        return Run(words, folder, result.code, result.out, result.err)

    def producers(self) -> set:
        """The examples whose outputs other examples read (and the world does not hold): they run in the world."""
        if self._producers is None:
            self._producers = set()
            for words in self.examples:
                outputs, inplace = self.outputs(words)
                for name in _inputs(words, outputs) + inplace:
                    producer = self.producer_of(name, words)
                    if producer is not None and not (self.home / name).exists() and name not in DERIVED:
                        self._producers.add(tuple(producer))
        return self._producers

    def producer_of(self, name: str, consumer=None) -> list[str] | None:
        if name in PRODUCED_BY:
            return substituted(shlex.split(PRODUCED_BY[name]))
        candidates = sorted((words for words in self.examples if words != consumer),
                            key=lambda words: tuple(words) in self.skipped)  # one that runs here first
        for words in candidates:  # an example that writes this very path, else one that writes a folder above it
            if name in self.outputs(words)[0]:
                return words
        for words in candidates:
            if any(name.startswith(o + os.sep) for o in self.outputs(words)[0]):
                return words
        return None

    def ensure(self, name: str) -> None:
        """Make the world file ``name`` if an example needs it and it is not there yet."""
        if (self.home / name).exists():
            return
        if name in DERIVED:
            DERIVED[name](self, name)
            return
        producer = self.producer_of(name)
        if producer is not None and tuple(producer) in self.skipped:
            pytest.skip(f"needs {name}, which `{shlex.join(producer)}` makes: {self.skipped[tuple(producer)]}")
        if producer is not None:
            run = self.run_example(producer, in_world=True)
            assert run.code == 0, f"`{shlex.join(producer)}`, which makes {name}: {run.problems(0)}"

    def check(self, run: Run, expected: int) -> list[str]:
        """``run.problems``, once: a folder of its own is removed when the run passed (its outputs are
        model-sized and no other example reads them)."""
        key = (tuple(run.words), expected)
        if key not in self.checked:
            self.checked[key] = run.problems(expected)
            if self.checked[key]:
                self.failed = True
            elif run.folder != self.home:
                shutil.rmtree(run.folder, ignore_errors=True)
        return self.checked[key]

    def run_example(self, words: list[str], in_world: bool | None = None) -> Run:
        """Run an example (once: a repeat gets the first run), its inputs made first."""
        key = tuple(words)
        if key in self.done:
            return self.done[key]
        outputs, inplace = self.outputs(words)
        for name in _inputs(words, outputs) + inplace:
            self.ensure(name)
        if in_world is None:
            in_world = words[0] == "reid-train" or key in self.producers()
        if in_world:
            folder = self.home
        else:  # a folder of its own: the world's files linked, its outputs not (copied when updated in place)
            folder = self.runs / f"{len(self.done):03d}"
            folder.mkdir()
            written = {Path(o).parts[0] for o in outputs}
            for entry in self.home.iterdir():
                if entry.name in written or entry.name in inplace:
                    continue
                (folder / entry.name).symlink_to(entry)
            for name in inplace:
                shutil.copytree(self.home / name, folder / name, symlinks=True)
        run = self.execute(words, folder)
        run.outputs = outputs + inplace
        self.done[key] = run
        return run


@pytest.fixture(scope="module")
def world(tmp_path_factory, monkeypatch_module, one_torch_thread):
    monkeypatch_module.delenv("REID_DATASETS", raising=False)  # reid-train's default: datasets/ in the folder
    world = World(tmp_path_factory.mktemp("docs-examples"))
    world.build()
    yield world
    _stop_ray()
    if not world.failed:  # ~0.6 GB of models; a failure keeps them to look at
        shutil.rmtree(world.home.parent, ignore_errors=True)


def _stop_ray() -> None:
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("where,line", EXAMPLES, ids=IDS)
def test_example_runs(where, line, world):
    words = shlex.split(line)
    if len(words) < 2 and words[0] == "reid-export":
        pytest.skip("the bare program prints its help")
    reason = skip_reason(words)
    if reason:
        pytest.skip(reason)
    run = world.run_example(substituted(words))
    problems = world.check(run, expected_code(where, line))
    assert not problems, f"{where}: `{line}`\n  ran as `{shlex.join(run.words)}` in {run.folder}:\n  " + \
        "\n  ".join(problems)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_wrong_file_name_fails_the_run(world):
    """The runner can fail: a missing input (one line, exit 1) and an output that was not written."""
    good = world.run_example(substituted(shlex.split("reid-export extract model.onnx crops/ -o feats.npy")))
    assert good.problems(0) == []
    bad = world.run_example(substituted(shlex.split("reid-export extract model.onnx crops-typo/ -o typo.npy")))
    assert bad.problems(0) and "exit 1" in bad.problems(0)[0] and "crops-typo" in bad.problems(0)[0]
    missing = Run(good.words, good.folder, 0, "", "", outputs=["feats.npy", "not-written.npy"])
    assert missing.problems(0) == ["not-written.npy: named as an output but not written"]


def test_every_substitution_is_used_and_says_why():
    used = {sub for _, line in EXAMPLES for sub in SUBSTITUTIONS if sub.apply(shlex.split(line)) != shlex.split(line)}
    assert [s.old for s in SUBSTITUTIONS if s not in used] == []
    assert all(len(s.why) > 20 for s in SUBSTITUTIONS)


# ---- the Python examples --------------------------------------------------------------------------

def _python_blocks(path: Path) -> list[tuple[str, str]]:
    """(where, code) for every ```python block of the page."""
    out, block, start, in_code = [], [], 0, False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if in_code and block is not None:
                out.append((f"{path.relative_to(REPO)}:{start}", "\n".join(block) + "\n"))
            in_code, start = not in_code, number
            block = [] if in_code and line[3:].strip() == "python" else None
            continue
        if in_code and block is not None:
            block.append(line)
    return out


PYTHON_EXAMPLES = [b for page in PAGES for b in _python_blocks(page)]
FASTREID_REASON = ("fast-reid's own code, run by tests/test_fastreid_client.py (in .venv-fastreid, which has the "
                   "fastreid package) on what reid-train writes")

# What runs otherwise than written in the Python examples, and why (text of the code, replaced).
PYTHON_SUBSTITUTIONS = [
    ('"configs/Market1501/bagtricks_R50.yml"', f'"{SMALL}/bagtricks_R50.yml"', SUBSTITUTIONS[0].why),
    ('calib_dirs=["bounding_box_train/"]',
     'calib_dirs=["bounding_box_train/"], calib_size=32, val_size=16, max_float=0, '
     'gate=api.Tolerances.reduced_precision(max_pair_error=0.0)',
     "the world's random-weight INT8 lands on either side of the 0.03 gate by chance (measured 0.02-0.05): "
     "the examples take their refusal branch, which the five real models of benchmarks/int8_must_show.py take; "
     "32 calibration and 16 held-out crops instead of 512 and 128, as the CLI examples' calibration row, and no "
     "search for layers to keep in float, which cannot reach that gate"),
    ("duration=1)", "duration=0.2, warmup=0.05)", "1 s warm-up + 1 s per model and batch size"),
]
PYTHON_OUTPUT_CALLS = ("export_onnx", "quantize", "deepstream", "boxmot", "triton")  # their 2nd argument is written


def python_substituted(code: str) -> str:
    for old, new, _ in PYTHON_SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


REFUSED = "max_pair_error=0.0"  # the substitution above: a call holding it is refused and writes nothing


def python_names(code: str) -> tuple[list[str], list[str], list[str]]:
    """(names the code writes: the output argument of the calls that write; names a refused call must not
    write; names it may read: every other string constant)."""
    import ast

    tree = ast.parse(code)
    written, refused = [], []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in PYTHON_OUTPUT_CALLS and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            (refused if REFUSED in ast.unparse(node) else written).append(_norm(node.args[1].value))
    read = [_norm(n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value and " " not in n.value and _norm(n.value) not in written + refused]
    return written, refused, list(dict.fromkeys(read))


def run_python(world: "World", where: str, code: str) -> tuple[Path, list[str]]:
    """Run a Python example in a folder of its own that links the world's files (not the ones it writes);
    returns the folder and the names it writes."""
    written, refused, read = python_names(code)
    for name in read:
        if (REPO / name).exists() or not re.search(r"[./]", name):
            continue  # the repository's configs, or a word that is no path ("int8")
        world.ensure(name)
    folder = world.runs / f"py-{len(list(world.runs.iterdir())):03d}"
    folder.mkdir()
    tops = {Path(w).parts[0] for w in written + refused}
    for entry in world.home.iterdir():
        if entry.name not in tops:
            (folder / entry.name).symlink_to(entry)
    with _cwd(folder):
        exec(compile(code, where, "exec"), {"__name__": "__docs_example__"})  # noqa: S102 - our own docs
    return folder, written, refused


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("where,code", PYTHON_EXAMPLES, ids=[w for w, _ in PYTHON_EXAMPLES])
def test_python_example_runs(where, code, world):
    """Every ```python block of README.md and docs/ runs as written (but for PYTHON_SUBSTITUTIONS), its own
    asserts included, and writes what its calls name."""
    if "import fastreid" in code or "from fastreid" in code:
        pytest.skip(FASTREID_REASON)
    folder, written, refused = run_python(world, where, python_substituted(code))
    for name in written:
        assert (folder / name).exists(), f"{where}: {name} not written"
    for name in refused:
        assert not (folder / name).exists(), f"{where}: {name} written by a refused call"


def test_python_examples_are_found_and_every_substitution_is_used():
    assert any(w.startswith("README.md") for w, _ in PYTHON_EXAMPLES)
    assert any(w.startswith("docs/api.md") for w, _ in PYTHON_EXAMPLES)
    for old, new, why in PYTHON_SUBSTITUTIONS:
        assert any(old in code for _, code in PYTHON_EXAMPLES), old
        assert len(why) > 20
    written, refused, read = python_names('api.export_onnx("a.pth", "b.onnx", config="c.yml")\n'
                                          'api.quantize("b.onnx", "c.onnx", "int8", gate=T(max_pair_error=0.0))\n'
                                          'api.parity("a.pth", ["b.onnx"])')
    assert written == ["b.onnx"] and refused == ["c.onnx"] and sorted(read) == ["a.pth", "c.yml", "int8"]
