"""Every Engram layer of a model at once: export, compile and quantize folder to folder.

Each command builds the whole output folder in a hidden staging folder beside it and renames it into
place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from engram_export.core.checkpoint import Checkpoint
from engram_export.core.errors import EngramError
from engram_export.core.fileio import DEFAULT_WRITE, STAGING_PREFIX, WriteOptions, staged_folder
from engram_export.core.integrity import FileChecks, sha256
from engram_export.folders import PIPELINE
from engram_export.folders.manifest import Manifest, read_manifest, write_manifest
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing
from engram_export.models.hashing import EngramHashing
from engram_export.models.weights import build_layer, layer_prefix
from engram_export.onnx.export import export_layer
from engram_export.onnx.export_v41 import export_v41_layer
from engram_export.onnx.files import read_onnx_file
from engram_export.openvino.compile import compile_onnx
from engram_export.openvino.quantize import calibration_from_text, quantize, read_calibration, read_model

__all__ = [name for name in PIPELINE if name != "calibrate"]  # served by engram_export.folders

log = logging.getLogger(__name__)


def layer_file(layer_id: int, suffix: str) -> str:
    return f"layer_{layer_id}{suffix}"


def export_folder(
    config, folder: Path, weights: Path | None = None, prefix: str = "", seed: int | None = None, optimize: bool = True
) -> Path:
    """Export every layer in ``config.layer_ids``. ``prefix`` may hold ``{layer}`` (full-model
    checkpoints); random weights use ``seed + layer id``."""
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
    checkpoint_dir: Path, output: Path, layer_id: int | None = None, write: WriteOptions = DEFAULT_WRITE
) -> Path:
    """A DeepSeek-V4.1 checkpoint folder: layer ``layer_id`` to an .onnx, or every Engram layer to a
    folder with a manifest. Tables stay in the checkpoint's shards, hard-linked beside the files."""
    checkpoint = Checkpoint(checkpoint_dir)
    config = V41Config.from_checkpoint(checkpoint)
    hashing = V41Hashing(config)
    if layer_id is not None:
        return export_v41_layer(checkpoint, config, layer_id, output, hashing, write)
    layers = {layer_id: layer_file(layer_id, ".onnx") for layer_id in config.layer_ids}
    with staged_folder(output) as staging:
        for layer_id, name in layers.items():
            export_v41_layer(checkpoint, config, layer_id, staging / name, hashing, write)
        source = f"checkpoint {checkpoint.folder.resolve()} (table shards hard-linked, not copied)"
        write_manifest(staging, Manifest(config, layers, "onnx", source=source))
    return output


def export_random_v41(
    config, output: Path, layer_id: int | None = None, seed: int = 0, write: WriteOptions = DEFAULT_WRITE
) -> Path:
    """A DeepSeek-V4.1 config with random weights: a synthetic checkpoint (``synthetic.py``) written
    beside ``output`` and exported (``export_checkpoint``); its shards live on only as the output's hard
    links. Tables of more than 2**30 values are left sparse (rows of zeros)."""
    small = all(config.table_rows(layer) * config.head_dim <= 2**30 for layer in config.layer_ids)
    rows = None if small else {layer: np.zeros(0, np.int64) for layer in config.layer_ids}
    if not small:
        log.warning("random-init tables this large are left sparse (rows of zeros)")
    # named like a staging folder, so that the next run here removes it if this one is killed
    scratch_prefix = f"{STAGING_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=scratch_prefix, dir=Path(output).parent) as scratch:
        checkpoint = write_v41_checkpoint(
            Path(scratch) / "checkpoint", config.to_dict(), seed=seed, rows=rows, tokenizer=True
        )
        return export_checkpoint(checkpoint, Path(output), layer_id, write)


def compile_folder(source: Path, folder: Path, precision: str, write: WriteOptions = DEFAULT_WRITE) -> Path:

    checks = FileChecks()  # one load: the manifest hashes each file, compile_onnx checks its size again
    manifest = read_manifest(source, checks)
    if manifest.kind != "onnx":
        raise EngramError(f"{source} holds compiled models; compile the exported folder")
    layers = {}
    with staged_folder(folder) as staging:
        for layer_id, name in manifest.layers.items():
            layers[layer_id] = layer_file(layer_id, ".xml")
            compile_onnx(Path(source) / name, staging / layers[layer_id], precision, write, checks)
        write_manifest(staging, Manifest(manifest.config, layers, "openvino", precision, source=manifest.source))
    return folder


def quantize_folder(source: Path, folder: Path, options, write: WriteOptions = DEFAULT_WRITE) -> Path:

    checks = FileChecks()  # as compile_folder's
    manifest = read_manifest(source, checks)
    layers = {}
    with staged_folder(folder) as staging:
        for layer_id, name in manifest.layers.items():
            layers[layer_id] = layer_file(layer_id, ".xml")
            quantize(Path(source) / name, staging / layers[layer_id], options, write, checks)
        write_manifest(
            staging, Manifest(manifest.config, layers, "openvino", options.precision, options.mode, manifest.source)
        )
    return folder


def calibration_for(
    model_path: str | Path,
    texts: list | None = None,
    npz: str | Path | None = None,
    text: str | Path | None = None,
    hidden_npy: str | Path | None = None,
    tokens: int = 64,
    count: int = 300,
) -> list[dict]:
    """Calibration items for static INT8 of ``model_path`` (.onnx, .xml or a folder of layers, whose
    layers share one config): from real text (``texts``, ``calibration_from_text``), or from an .npz,
    or a text file with hidden states (``read_calibration``)."""
    if (npz is None and text is None) == (not texts):
        raise EngramError(
            "mode int8 needs calibration data: --calibration-text FILE [...], or --calibration (an .npz, "
            "or a text file with --calibration-hidden)"
        )
    source = Path(model_path)
    if source.is_dir():
        source = source / next(iter(read_manifest(source, check_hashes=False).layers.values()))
    if source.suffix == ".onnx":  # its info alone: quantize reads (and checks) the model itself
        info = read_onnx_file(source, FileChecks("size"))[1]
    else:
        info = read_model(source)[1]  # an .xml: refused here already if it is not f32
    if texts:
        return calibration_from_text(info, texts, tokens, count)
    return read_calibration(info.config, info.num_ids, npz=npz, text=text, hidden_npy=hidden_npy)
