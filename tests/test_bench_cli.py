"""``engram-export bench MODE``: each mode takes only its own flags (argparse refuses the others, naming the
mode), and bench tables name the precision that ran."""

from __future__ import annotations

import argparse

import pytest

from engram_export.cli import build_parser
from engram_export.cli.bench import MODES
from engram_export.measure import bench, common
from engram_export.measure.bench import BenchRow, report
from engram_export.measure.common import target_line
from tests.helpers import listing, run_cli


def _mode_flags() -> dict[str, set[str]]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (modes,) = [a for a in commands.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: set(parser._option_string_actions) for name, parser in modes.choices.items()}


def test_each_mode_has_only_its_own_flags():
    flags = _mode_flags()
    assert sorted(flags) == sorted(MODES)
    owners = {
        flag: sorted(mode for mode, own in flags.items() if flag in own)
        for flag in (
            "--profile",
            "--precision",
            "--batch",
            "--warmup",
            "--weights",
            "--text",
            "--shards",
            "--backbone-layers",
        )
    }
    assert owners == {
        "--profile": ["layer"],
        "--precision": ["layer"],
        "--batch": ["layer", "lookup"],
        "--warmup": ["layer", "lookup"],
        "--weights": ["decode", "layer"],
        "--text": ["ray", "tiered"],
        "--shards": ["ray"],
        "--backbone-layers": ["decode", "ray", "tiered"],
    }
    assert all({"-q", "--debug", "--workdir"} <= own for own in flags.values())


@pytest.mark.parametrize(
    "argv,foreign",
    [
        (["lookup"], ["--profile"]),
        (["decode", "--config", "tiny"], ["--batch", "2"]),
        (["layer"], ["--text", "corpus.txt"]),
        (["layer"], ["--shards", "2"]),
        (["tiered", "--text", "corpus.txt"], ["--shards", "2"]),
        (["ray", "--text", "corpus.txt"], ["--calibrate-mib", "1"]),
        (["lookup"], ["--precision", "bf16"]),
    ],
)
def test_a_flag_of_another_mode_is_refused_by_the_parser(tmp_path, monkeypatch, argv, foreign):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("bench", *argv, *foreign)
    assert code == 2 and out == "" and "Traceback" not in err, err
    mode = argv[0]
    assert f"engram-export bench {mode}: error: unrecognized arguments: {' '.join(foreign)}" in err, err
    assert f"engram-export bench {mode} --help" in err.splitlines()[-1], err
    assert listing(tmp_path) == []  # refused while parsing: nothing ran


def test_a_mode_is_required_and_listed():
    code, _, err = run_cli("bench")
    assert code == 2 and "the following arguments are required: {layer,lookup,decode,tiered,ray,rows}" in err, err
    code, _, err = run_cli("bench", "--tiered")  # the flags of before the modes
    assert code == 2 and "{layer,lookup,decode,tiered,ray,rows}" in err, err


def test_text_modes_need_text():
    for mode in ("tiered", "ray"):
        code, _, err = run_cli("bench", mode)
        assert code == 2 and f"engram-export bench {mode}: error: the following arguments are required: --text" in err


@pytest.mark.parametrize("runs", ["f32", "bf16"])
def test_precision_label_names_what_runs(monkeypatch, runs):
    monkeypatch.setattr(common, "runs_as", lambda precision, device="CPU": runs if precision == "bf16" else precision)
    assert common.precision_label("bf16") == ("bf16" if runs == "bf16" else "bf16 (runs f32 here)")
    assert common.precision_label("f32") == "f32"
    assert common.precision_label("int8") == "int8"  # a quantization mode, not a precision hint


def test_target_line():
    assert target_line("a / b <= 1.2", 1.1, 1.2) == "  a / b <= 1.2: 1.10 met"
    assert target_line("a faster >= 1.5x", 1.4, -1.5, "bf16 runs f32 here") == (
        "  a faster >= 1.5x: 1.40 MISSED (bf16 runs f32 here)"
    )


def _row(name, precision, ms, ran_as="", group=0):
    return BenchRow(name, precision, None, None, ran_as=ran_as, group=group, times_ms={(50, 14): [ms, ms]})


@pytest.mark.parametrize("ran", ["f32", "bf16"])
def test_report_names_the_precision_that_ran(ran):
    """Rows and targets keep their names (targets match on them) and print what ran beside them."""
    rows = [
        _row("pytorch eager (demo layout) f32", "f32", 120.0),
        _row("openvino optimized bf16", "bf16", 25.0, ran_as=ran),
        _row("openvino matmul floor bf16", "bf16", 22.0, ran_as=ran),
    ]
    text = report(rows, [(50, 14)])
    emulated = ran != "bf16"
    assert ("openvino optimized bf16 (runs f32 here)" in text) == emulated
    assert ("openvino matmul floor bf16 (runs f32 here)" in text) == emulated
    (target,) = [line for line in text.splitlines() if line.startswith("  optimized bf16 / bf16 floor <= 1.2:")]
    assert target.startswith("  optimized bf16 / bf16 floor <= 1.2: 1.14 met")
    assert target.endswith("(bf16 runs f32 here)") == emulated
    (eager,) = [line for line in text.splitlines() if line.startswith("  eager f32 / optimized bf16 >= 6:")]
    assert eager.endswith("(bf16 runs f32 here)") == emulated


def test_no_bench_imports_another_bench():
    """What benches share lives in measure/common.py and measure/v41_text.py: no bench module imports
    a name of another bench module, private or not."""
    import ast
    from pathlib import Path

    benches = {"bench", "bench_lookup", "bench_v41", "decode_bench", "bench_tiered", "bench_sharded"}
    folder = Path(bench.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engram_export.measure."):
                imported = node.module.rsplit(".", 1)[1]
                assert not any(alias.name.startswith("_") for alias in node.names), (path.name, node.module)
                assert not (path.stem in benches and imported in benches), (path.name, node.module)
