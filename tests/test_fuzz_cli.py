"""A seeded fuzz pass over the CLI, in-process: random argv, configs, weights, model and input files,
paths and read-only folders. Whatever happens: no trace, exit 0, 1 or 2 (0 never where an input is
surely bad), a failure ends in one ``engram-export`` line, and no staging folder or partial output
is left."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from engram_export.measure.verify import random_inputs
from tests.helpers import STAGING_PREFIX, TINY_LAYER, listing, run_cli

CASES = 400
BUDGET_S = 20  # stop early on a slow machine rather than run for minutes
HUGE = "99999999999999999999999"
GARBAGE = ["abc", "", "1.5", "1e3", "0x10", "nan", "--", "-"]
BAD_COUNTS = ["0", "-1", "-7", *GARBAGE]  # a huge count is no error: it just takes long
RO = "read-only"  # folders of this name look read-only (tests often run as root, which writes anyway)


@pytest.fixture(scope="module")
def corpus(tiny_files, folders, tiny_layer, tiny_config, tmp_path_factory) -> dict[str, Path]:
    """Valid files of every kind, to start each case from."""
    root = tmp_path_factory.mktemp("corpus")
    save_file(dict(tiny_layer.state_dict()), root / "w.safetensors")
    ids, hidden = random_inputs(tiny_config, tiny_config.vocab_size, 2, 3)
    np.savez(root / "in.npz", input_ids=ids, hidden_states=hidden)
    config = Path(__file__).parents[1] / "models/presets/tiny.json"
    return {
        "onnx": tiny_files["onnx"],
        "xml": tiny_files["f32"],
        "npz": root / "in.npz",
        "safetensors": root / "w.safetensors",
        "json": config,
        "folder": folders["onnx"],
        "xml-folder": folders["f32"],
    }


def corrupt(rng: random.Random, data: bytes) -> tuple[bytes, bool]:
    """Damaged bytes, and whether they are surely unreadable."""
    kind = rng.choice(["truncate", "flip", "empty", "random"])
    if kind == "empty" or not data:
        return b"", True
    if kind == "truncate":
        return data[: rng.randrange(len(data))], False
    if kind == "random":
        return rng.randbytes(rng.choice([1, 17, 4096])), False
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data), False


def mutated_config(rng: random.Random, path: Path, case: Path) -> Path:
    """The config with one field deleted, added or given a value of another type or size."""
    data = json.loads(path.read_text())
    field = rng.choice(sorted(data) + ["bogus"])
    values = ["x", [], {}, None, True, False, 1.5, -1, 0, 10**15, [10**15, 7], [997], "1499"]
    if field in data and rng.random() < 0.25:
        del data[field]
    else:
        data[field] = rng.choice(values)
    out = case / "config.json"
    out.write_text(json.dumps(data))
    return out


class Case:
    """One argv being built: its inputs live in ``folder`` (copies, when damaged) and its output in
    ``folder / 'out'``; ``bad`` says an input is surely refused."""

    def __init__(self, rng: random.Random, folder: Path):
        self.rng, self.folder, self.bad = rng, folder, False
        self.out = folder / "out"
        self.out.mkdir(parents=True)

    def source(self, path: Path, suffix: str) -> Path:
        """``path``, or (sometimes) a damaged copy, a missing file, a folder, a wrong suffix."""
        rng, roll = self.rng, self.rng.random()
        if roll < 0.6:
            return path
        kind = rng.choice(["missing", "folder", "suffix", "corrupt", "corrupt", "corrupt"])
        target = self.folder / f"src{path.suffix if path.is_file() else ''}"
        if kind == "missing":
            self.bad = True
            return self.folder / f"missing{suffix}"
        if kind == "folder" and path.is_file():
            self.bad = True
            (self.folder / f"dir{suffix}").mkdir()
            return self.folder / f"dir{suffix}"
        if kind == "suffix" and path.is_file():
            self.bad |= path.suffix != ".json"  # a config is read whatever its name
            shutil.copy(path, self.folder / "src.txt")
            return self.folder / "src.txt"
        if path.is_dir():  # a model folder: damage its manifest or one of its files
            shutil.copytree(path, target)
            victim = rng.choice(sorted(p for p in target.iterdir()))
            if rng.random() < 0.3:
                victim.unlink()
                self.bad = True
            else:
                data, surely = corrupt(rng, victim.read_bytes())
                victim.write_bytes(data)
                self.bad |= surely and victim.name == "manifest.json"
            return target
        if path.suffix == ".json" and rng.random() < 0.7:
            return mutated_config(rng, path, self.folder)
        shutil.copy(path, target)
        if path.suffix == ".xml":
            shutil.copy(path.with_suffix(".bin"), target.with_suffix(".bin"))
            target = target if rng.random() < 0.5 else target.with_suffix(".bin")
        data, surely = corrupt(rng, target.read_bytes())
        target.write_bytes(data)
        self.bad |= surely and target.suffix != ".bin"  # an empty .bin may suit an IR without weights
        return target.with_suffix(path.suffix)

    def output(self, suffix: str | None, inputs=()) -> Path:
        """The ``-o`` path for a ``suffix`` file (None: a folder), sometimes one that must be refused."""
        rng, inputs = self.rng, [p for p in inputs if p is not None]
        name = f"result{suffix or ''}"
        if rng.random() < 0.6:
            return self.out / name
        self.bad = True
        kind = rng.choice(["folder", "missing", RO, "suffix", "long", "input"])
        if kind == "folder":
            (self.out / name).mkdir()
            (self.out / name / "keep").write_text("x")
        elif kind == "missing":
            return self.out / "nope" / name
        elif kind == RO:
            (self.out / RO).mkdir()
            return self.out / RO / name
        elif kind == "suffix" and suffix:
            return self.out / "result.txt"
        elif kind == "long":
            return self.out / ("n" * 300 + (suffix or ""))
        elif kind == "input" and any(self.folder in p.parents for p in inputs):
            return rng.choice([p for p in inputs if self.folder in p.parents])  # only the case's copies
        else:
            self.bad = False
        return self.out / name

    def flags(self, argv: list, counts: dict[str, int]) -> list:
        """Sometimes: an unknown flag, a dropped flag, or a bad value for one of ``counts`` (flag:
        minimum)."""
        rng, roll = self.rng, self.rng.random()
        if roll < 0.1:
            self.bad = True
            return [*argv, rng.choice(["--bogus", "-x", "--layer"])]
        if roll < 0.2:
            flags = [i for i, a in enumerate(argv) if str(a).startswith("-") and i + 1 < len(argv)]
            if flags:
                i = rng.choice(flags)
                self.bad = argv[i] in ("-o", "--config", "--mode", "--inputs")
                return argv[:i] + argv[i + 2 :]
        if roll < 0.5 and counts:
            flag = rng.choice(sorted(counts))
            value = rng.choice(BAD_COUNTS + ["1", "3", "2", HUGE])
            self.bad |= not value.lstrip("-").isdigit() or int(value) < counts[flag]
            return [*argv, flag, value]
        return argv


def build(rng: random.Random, case: Case, corpus: dict[str, Path]) -> list:
    """One argv: a command on (maybe damaged) inputs with a (maybe bad) output and flags."""
    command = rng.choice(
        ["export", "export", "optimize", "compile", "compile-folder", "quantize", "run", "run", "checks"]
    )
    if command == "export":
        weights = case.source(corpus["safetensors"], ".safetensors") if rng.random() < 0.5 else None
        source = (
            ["--weights", weights, "--layer", TINY_LAYER]
            if weights
            else ["--random-init", "--layer", rng.choice([1, 3])]
        )
        argv = ["export", "--config", case.source(corpus["json"], ".json"), *source]
        argv = [*case.flags(argv, {"--layer": 1, "--seed": 0}), "-o", case.output(".onnx", [weights])]
        if not case.bad:  # a trace costs seconds: only where something is surely wrong
            argv[-1] = case.folder / "nope" / "x.onnx"
            case.bad = True
        return argv
    if command == "optimize":
        model = case.source(corpus["onnx"], ".onnx")
        return ["optimize", model, "-o", case.output(".onnx", [model])]
    if command == "compile":
        model = case.source(corpus["onnx"], ".onnx")
        argv = ["compile", model, "--precision", rng.choice(["f32", "bf16"]), "-o", case.output(".xml", [model])]
        return case.flags(argv, {})
    if command == "compile-folder":
        model = case.source(corpus["folder"], "")
        return ["compile", model, "-o", case.output(None, [model])]
    if command == "quantize":
        model = case.source(corpus[rng.choice(["onnx", "xml"])], ".xml")
        mode = rng.choice(["int8-weights", "int4-weights", "int4-weights"])
        argv = ["quantize", model, "--mode", mode, "--group-size", "32", "-o", case.output(".xml", [model])]
        return case.flags(argv, {"--group-size": 1, "--subset-size": 1})
    if command == "run":
        model = case.source(corpus[rng.choice(["onnx", "xml"])], ".xml")
        inputs = case.source(corpus["npz"], ".npz")
        argv = [
            "run",
            model,
            "--inputs",
            inputs,
            "--runtime",
            rng.choice(["ov", "ort"]),
            "-o",
            case.output(".npz", [model, inputs]),
        ]
        return case.flags(argv, {"--layer": 1})
    # bench, demo and verify would run for long: only surely bad values that are refused at once
    case.bad = True
    flag, value = (
        rng.choice(
            [
                ("--batch", "--tokens"),
                ("--repeat", None),
                ("--warmup", None),
                ("--engram-vocab-size", None),
                ("--workdir", None),
            ]
        ),
        rng.choice(BAD_COUNTS),
    )
    if flag[0] == "--engram-vocab-size" and rng.random() < 0.3:
        value = HUGE  # more memory than any machine has: refused before any work
    if flag[0] == "--workdir":
        extra = ["--workdir", rng.choice([case.folder / "missing", corpus["npz"]])]
    elif flag[0] == "--warmup":
        extra = ["--warmup", rng.choice(["-1", "-9", *GARBAGE])]
    else:
        extra = [flag[0], value] + ([flag[1], "2"] if flag[1] else [])
    if extra[0] in ("--engram-vocab-size", "--workdir") and rng.random() < 0.5:
        return ["demo", *extra]
    return ["bench", "layer", "--config", "tiny", *extra]


def test_fuzz_the_cli(corpus, tmp_path, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != RO and access(p, mode))
    rng, start, unexpected = random.Random(0), time.perf_counter(), []
    for number in range(CASES):
        if time.perf_counter() - start > BUDGET_S:
            break
        case = Case(rng, tmp_path / f"case{number}")
        argv = build(rng, case, corpus)
        before = listing(case.folder)
        code, out, err = run_cli(*argv)
        shown = f"case {number}: engram-export {' '.join(map(str, argv))}\nexit {code}\n{err[-3000:]}"
        assert "Traceback" not in out + err, shown
        assert code in (0, 1, 2), shown
        assert not (code == 0 and case.bad), shown
        # outputs go into the case's folder: its tree and tmp_path's top (not every earlier case's tree)
        assert not [*case.folder.rglob(f"{STAGING_PREFIX}*"), *tmp_path.glob(f"{STAGING_PREFIX}*")], shown
        if code != 0:
            assert err.strip().splitlines()[-1].startswith("engram-export"), shown
            assert listing(case.folder) == before, shown
        if code == 0 and "-o" in argv:
            assert Path(argv[argv.index("-o") + 1]).exists(), shown
        if code == 1:
            unexpected.append(shown)
    assert not unexpected, "\n\n".join(unexpected)
