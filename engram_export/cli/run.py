"""engram-export run: a model on input_ids and hidden_states from an .npz."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import FLAGS
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_output_file

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser("run", parents=[FLAGS], help="run a model on input_ids and hidden_states from an .npz")
    p.add_argument("model", type=Path, help=".xml (OpenVINO) or .onnx")
    p.add_argument(
        "--inputs",
        type=Path,
        required=True,
        help=".npz with input_ids and hidden_states (and, for DeepSeek-V4.1, token_mask)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help=".npz to write 'output' to")
    p.add_argument("--runtime", choices=["ov", "ort"], default="ov")
    p.add_argument(
        "--precision", choices=["f32", "bf16"], default=None, help="OpenVINO inference precision (default: the model's)"
    )
    p.add_argument("--layer", type=int, help="with a model folder: the layer to run")
    p.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from engram_export.core.fileio import load_npz, staged_output
    from engram_export.runtime import EngramRuntime, LayerRuntime

    check_output_file(args.output, ".npz", [args.model, args.inputs])
    inputs = load_npz(args.inputs, ("input_ids", "hidden_states"), optional=("token_mask",))
    loaded = EngramRuntime(args.model, runtime=args.runtime, precision=args.precision)
    runtime: EngramRuntime | LayerRuntime = loaded
    if args.layer is not None or args.model.is_dir():
        if args.layer is None:
            raise EngramError(f"{args.model} serves layers {loaded.layer_ids}: give --layer")
        runtime = loaded.layer(args.layer)
    output = runtime(inputs["input_ids"], inputs["hidden_states"], inputs.get("token_mask"))
    with staged_output(args.output) as staged:
        np.savez(staged, output=output)
    print(f"{args.output}: output {list(output.shape)} from {runtime}")
