"""Check engram-export's engine plug-ins on a GPU host (docs/engines.md): what CI cannot run without one.

    python samples/engines_gpu_check.py rows --checkpoint DeepSeek-V4.1-Flash/ --folder v41-tiered \\
        [--table-memory tiered] [--cache-budget 16GiB] [--tables ray://v41] [--text corpus.txt]
    python samples/engines_gpu_check.py throughput --model DeepSeek-V4.1-Flash/ --folder v41-tiered \\
        [--table-memory tiered] [--engine vllm] -- [flags of `vllm bench throughput`]

``rows``: for every Engram layer of the folder, the hash ids of real text (this project's hash, equal to
both engines' in CI), read through the plug-ins' GPU branch (vLLM's ``lookup`` into a CUDA ``out`` in
both forms, SGLang's ``_owned_rows``), must equal the checkpoint's own bytes and the engines' decode of
them, bit for bit; it prints the time of each lookup (ids to the host, rows into pinned memory, copy to
the GPU) at B = 1, 8, 64 tokens. ``throughput``: `vllm bench throughput` twice, without and with the
plug-in, and the ratio of their tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _settings(args) -> dict[str, str]:
    env = {"ENGRAM_EXPORT_ROWS": str(args.folder), "ENGRAM_EXPORT_TABLE_MEMORY": args.table_memory}
    if args.cache_budget:
        env["ENGRAM_EXPORT_CACHE_BUDGET"] = args.cache_budget
    if args.tables:
        env["ENGRAM_EXPORT_TABLES"] = args.tables
    return env


def _checkpoint_rows(checkpoint: Path, layer: int, ids: np.ndarray):
    """The stored codes and scales of ``ids`` of the checkpoint's layer ``layer``, read by row."""
    import torch
    from safetensors import safe_open

    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = f"layers.{layer}.engram.embed.weight"
    unique, inverse = np.unique(ids, return_inverse=True)
    parts = []
    for key in (name, name.replace("weight", "scale")):
        with safe_open(checkpoint / weight_map[key], "pt") as opened:
            table = opened.get_slice(key)
            rows = torch.stack([table[int(row) : int(row) + 1][0] for row in unique])
        parts.append(rows.view(torch.uint8)[torch.from_numpy(inverse.reshape(-1))].reshape(*ids.shape, -1))
    return parts


def _hash_ids(rows, layer: int, text: Path | None, tokens: int) -> np.ndarray:
    from engram_export.core.text import token_stream, windows
    from engram_export.models.table_rows import hashing_of, table_rows

    config = rows.config
    if text is None:
        import importlib.metadata

        prose = "\n".join(dist.metadata.get_payload() or "" for dist in importlib.metadata.distributions())
        text = Path("/tmp/engram_prose.txt")
        text.write_text(prose[:2_000_000])
    ids = windows(token_stream(config.tokenizer, [text]), tokens, 1)
    return table_rows(hashing_of(config), ids, None, layer)[0]  # [tokens, columns]


def check_rows(args) -> int:
    os.environ.update(_settings(args))
    import torch

    from engram_export.engines import settings, sglang_plugin, vllm_plugin

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU here: --device cpu checks the plug-ins' CPU branch")
        return 2
    rows = settings.open_rows()
    failures = 0
    for layer in rows:
        table = rows[layer]
        ids = _hash_ids(rows, layer, args.text, 64)
        columns = ids.shape[1]
        codes, scales = _checkpoint_rows(args.checkpoint, layer, ids)
        expected_packed = torch.cat([codes, scales], -1).to(device)
        scale_bits = (scales.int() << 23).view(torch.float32)  # vLLM's reading of an E8M0 byte
        values = codes.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, 32)) * scale_bits.unsqueeze(-1)
        expected_vllm = values.flatten(-2).to(torch.bfloat16).to(device)
        spec = codes.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, 32))
        spec = spec * scales.view(torch.float8_e8m0fnu).float().unsqueeze(-1)
        expected_sglang = spec.flatten(-2).to(torch.bfloat16).to(device)
        embedding = SimpleNamespace(
            part_n_hash_cols=columns,
            n_hash_cols=columns,
            head_start=0,
            vocab_start_idx=0,
            vocab_end_idx=table.table_rows,
            _engram_rows=table,
        )
        cuda_ids = torch.from_numpy(ids).int().to(device)
        packed = torch.empty(len(ids), columns, table.width("packed"), dtype=torch.uint8, device=device)
        bf16 = torch.empty(len(ids), columns, table.row_size, dtype=torch.bfloat16, device=device)
        vllm_plugin.lookup(embedding, cuda_ids, packed)
        vllm_plugin.lookup(embedding, cuda_ids, bf16)
        background = torch.empty_like(packed)  # vLLM's prefetch: issued, then waited for at the layer
        vllm_plugin.lookup(embedding, cuda_ids, background, background=True)
        vllm_plugin.finish_lookup(embedding)
        sglang = SimpleNamespace(row_start=0, rows=table.table_rows, _engram_rows=table, dim=table.row_size)
        sglang.new_rows = lambda indices, dim=table.row_size: torch.empty(
            *indices.shape, dim, dtype=torch.bfloat16, device=indices.device
        )
        owned = sglang_plugin._owned_rows(sglang, cuda_ids.long())
        _synchronize(device)
        checks = {
            "vLLM packed": torch.equal(packed, expected_packed),
            "vLLM packed, background": torch.equal(background, expected_packed),
            "vLLM bf16": torch.equal(bf16.view(torch.int16), expected_vllm.view(torch.int16)),
            "SGLang bf16": torch.equal(owned.view(torch.int16), expected_sglang.view(torch.int16)),
        }
        for name, ok in checks.items():
            print(f"layer {layer}: {name} rows {'equal the checkpoint' if ok else 'DIFFER'}")
            failures += not ok
        for batch in (1, 8, 64):
            out = packed[:batch]
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                vllm_plugin.lookup(embedding, cuda_ids[:batch], out)
                _synchronize(device)
                times.append(time.perf_counter() - start)
            p50, p99 = np.percentile(times, [50, 99]) * 1e6
            print(f"layer {layer}: lookup of B={batch} ({batch * columns} rows) p50 {p50:.0f} us, p99 {p99:.0f} us")
    print(rows.stats())
    return 1 if failures else 0


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


_THROUGHPUT = re.compile(r"Throughput: .*?([\d.]+) total tokens/s")


def throughput(args) -> int:
    command = ["vllm", "bench", "throughput", "--model", str(args.model), *args.engine_args]
    measured = {}
    for name, extra in (("without the plug-in", {}), ("with the plug-in", _settings(args))):
        env = {key: value for key, value in os.environ.items() if not key.startswith("ENGRAM_EXPORT_")}
        done = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, check=False)
        found = _THROUGHPUT.search(done.stdout)
        if done.returncode != 0 or found is None:
            print(f"{name}: vllm bench throughput failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            return 1
        measured[name] = float(found.group(1))
        print(f"{name}: {measured[name]:.1f} tokens/s")
    ratio = measured["with the plug-in"] / measured["without the plug-in"]
    print(f"with / without: {ratio:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in ("rows", "throughput"):
        sub = modes.add_parser(mode)
        sub.add_argument("--folder", type=Path, required=True, help="the folder engram-export wrote")
        sub.add_argument("--table-memory", default="mmap")
        sub.add_argument("--cache-budget")
        sub.add_argument("--tables", help="ray://NAME")
        if mode == "rows":
            sub.add_argument("--checkpoint", type=Path, required=True, help="the DeepSeek-V4.1 checkpoint")
            sub.add_argument("--text", type=Path, help="real text (default: installed packages' descriptions)")
            sub.add_argument("--rounds", type=int, default=200)
            sub.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the CPU branch")
        else:
            sub.add_argument("--model", type=Path, required=True)
            sub.add_argument("engine_args", nargs="*", help="after --: flags of `vllm bench throughput`")
    args = parser.parse_args()
    return check_rows(args) if args.mode == "rows" else throughput(args)


if __name__ == "__main__":
    sys.exit(main())
