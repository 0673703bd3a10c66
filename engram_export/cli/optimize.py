"""engram-export optimize: the graph passes alone on an exported .onnx."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import FLAGS, stage
from engram_export.core.fileio import check_output_file

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser("optimize", parents=[FLAGS], help="run the graph passes on an exported .onnx")
    p.add_argument("model", type=Path, help="exported .onnx")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx file")
    p.set_defaults(func=run)


def run(args) -> None:
    import collections

    from engram_export.onnx.export import load_onnx, save_onnx
    from engram_export.passes import optimize

    check_output_file(args.output, ".onnx", [args.model])
    model = load_onnx(args.model)
    before = collections.Counter(node.op_type for node in model.graph)
    with stage("optimizing the graph"):
        result = optimize(model)
    after = collections.Counter(node.op_type for node in model.graph)
    save_onnx(model, args.output)
    print(f"nodes: {sum(before.values())} -> {sum(after.values())}{'' if result.modified else ' (nothing to fuse)'}")
    for op in sorted(set(before) | set(after), key=lambda op: -before[op]):
        if before[op] != after[op]:
            print(f"  {op:20s} {before[op]:4d} -> {after[op]}")
    print(args.output)
