"""Every Engram layer of a model at once: export, compile and quantize folder to folder.

Each command builds the whole output folder in a hidden staging folder beside it and renames it into
place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

from engram_export.errors import EngramError
from engram_export.fileio import staged_folder
from engram_export.integrity import sha256
from engram_export.manifest import Manifest, read_manifest, write_manifest

__all__ = ["export_folder", "export_checkpoint", "compile_folder", "quantize_folder", "layer_file"]


def layer_file(layer_id: int, suffix: str) -> str:
    return f"layer_{layer_id}{suffix}"


def export_folder(
    config, folder: Path, weights: Path | None = None, prefix: str = "", seed: int | None = None, optimize: bool = True
) -> Path:
    """Export every layer in ``config.layer_ids``. ``prefix`` may hold ``{layer}`` (full-model
    checkpoints); random weights use ``seed + layer id``."""
    from engram_export.models.hashing import EngramHashing
    from engram_export.models.weights import build_layer, layer_prefix
    from engram_export.onnx.export import export_layer

    if weights is not None and len(config.layer_ids) > 1 and layer_prefix(prefix, 0) == layer_prefix(prefix, 1):
        raise EngramError(
            "exporting several layers from one checkpoint needs --prefix with {layer}, "
            "e.g. 'model.layers.{layer}.engram.'"
        )
    hashing = EngramHashing(config)
    layers = {}
    with staged_folder(folder) as staging:
        for layer_id in config.layer_ids:
            layer = build_layer(
                config,
                layer_id,
                weights=weights,
                prefix=prefix,
                seed=None if weights is not None else seed + layer_id,
                hashing=hashing,
            )
            layers[layer_id] = layer_file(layer_id, ".onnx")
            export_layer(layer, staging / layers[layer_id], optimize=optimize)
            del layer
        source = f"{weights} (sha256 {sha256(Path(weights))})" if weights else f"random-init seed {seed}"
        write_manifest(staging, Manifest(config, layers, "onnx", source=source))
    return folder


def export_checkpoint(
    checkpoint_dir: Path, output: Path, layer_id: int | None = None, copy_table: bool = False
) -> Path:
    """A DeepSeek-V4.1 checkpoint folder: layer ``layer_id`` to an .onnx, or every Engram layer to a
    folder with a manifest. Tables stay in the checkpoint's shards, hard-linked beside the files."""
    from engram_export.checkpoint import Checkpoint
    from engram_export.models.deepseek_v41 import V41Config, V41Hashing
    from engram_export.onnx.export_v41 import export_v41_layer

    checkpoint = Checkpoint(checkpoint_dir)
    config = V41Config.from_checkpoint(checkpoint)
    hashing = V41Hashing(config)
    if layer_id is not None:
        return export_v41_layer(checkpoint, config, layer_id, output, hashing, copy_table)
    layers = {layer_id: layer_file(layer_id, ".onnx") for layer_id in config.layer_ids}
    with staged_folder(output) as staging:
        for layer_id, name in layers.items():
            export_v41_layer(checkpoint, config, layer_id, staging / name, hashing, copy_table)
        source = f"checkpoint {checkpoint.folder.resolve()} (table shards hard-linked, not copied)"
        write_manifest(staging, Manifest(config, layers, "onnx", source=source))
    return output


def compile_folder(source: Path, folder: Path, precision: str, copy_table: bool = False) -> Path:
    from engram_export.openvino.compile import compile_onnx

    manifest = read_manifest(source)
    if manifest.kind != "onnx":
        raise EngramError(f"{source} holds compiled models; compile the exported folder")
    layers = {}
    with staged_folder(folder) as staging:
        for layer_id, name in manifest.layers.items():
            layers[layer_id] = layer_file(layer_id, ".xml")
            compile_onnx(Path(source) / name, staging / layers[layer_id], precision, copy_table)
        write_manifest(staging, Manifest(manifest.config, layers, "openvino", precision, source=manifest.source))
    return folder


def quantize_folder(source: Path, folder: Path, options, copy_table: bool = False) -> Path:
    from engram_export.openvino.quantize import quantize

    manifest = read_manifest(source)
    layers = {}
    with staged_folder(folder) as staging:
        for layer_id, name in manifest.layers.items():
            layers[layer_id] = layer_file(layer_id, ".xml")
            quantize(Path(source) / name, staging / layers[layer_id], options, copy_table)
        write_manifest(
            staging, Manifest(manifest.config, layers, "openvino", options.precision, options.mode, manifest.source)
        )
    return folder
