"""A folder holding every Engram layer of a model, described by ``manifest.json``.

``export`` without ``--layer`` writes one file per layer id plus the manifest; ``compile`` and
``quantize`` map a folder to a folder; ``EngramRuntime(folder)`` serves every layer. The manifest
records the config, each layer's file, the precision or quantization, where the weights came from,
and a SHA-256 of every file, which ``read_manifest`` checks before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from engram_export.errors import EngramError
from engram_export.models.config import EngramConfig

__all__ = ["Manifest", "MANIFEST", "read_manifest", "write_manifest", "sha256"]

MANIFEST = "manifest.json"
FORMAT = 1


@dataclasses.dataclass
class Manifest:
    config: EngramConfig
    layers: dict[int, str]  # layer id -> file name in the folder (.onnx or .xml)
    kind: str  # "onnx" or "openvino"
    precision: str = "f32"
    quantization: str | None = None
    source: str = ""  # the weights file (with its SHA-256) or "random-init seed N"
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> SHA-256


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _side_files(folder: Path, name: str) -> list[Path]:
    """A model file and what it needs beside it (ONNX external data, IR weights)."""
    main = folder / name
    return [p for p in (main, folder / f"{name}.data", main.with_suffix(".bin")) if p.is_file()]


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Hash every layer's files and write ``manifest.json`` (whole or not at all)."""
    from engram_export import progress
    from engram_export.fileio import staged_output

    with progress.stage(f"hashing the files of {len(manifest.layers)} layers"):
        manifest.hashes = {p.name: sha256(p) for name in manifest.layers.values()
                           for p in _side_files(folder, name)}
    data = {"format": FORMAT, "config": manifest.config.to_dict(), "kind": manifest.kind,
            "precision": manifest.precision, "quantization": manifest.quantization,
            "source": manifest.source, "layers": {str(k): v for k, v in manifest.layers.items()},
            "sha256": manifest.hashes}
    with staged_output(folder / MANIFEST) as staged:
        staged.write_text(json.dumps(data, indent=2))
    return folder / MANIFEST


def read_manifest(folder: str | Path, check_hashes: bool = True) -> Manifest:
    """The folder's manifest; refuses missing files and, with ``check_hashes``, changed ones."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EngramError(f"{folder} has no {MANIFEST} (export the model without --layer)")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(EngramConfig.from_dict(data["config"]),
                            {int(k): v for k, v in data["layers"].items()}, data["kind"],
                            data["precision"], data["quantization"], data["source"], data["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EngramError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from None
    for name in manifest.hashes:
        if not (folder / name).is_file():
            raise EngramError(f"{path} lists {name}, which is missing from {folder}")
    for layer, name in manifest.layers.items():
        if name not in manifest.hashes:
            raise EngramError(f"{path}: layer {layer}'s file {name} has no hash")
    if check_hashes:
        for name, expected in manifest.hashes.items():
            if sha256(folder / name) != expected:
                raise EngramError(f"{folder / name} does not match its SHA-256 in {path} "
                                  f"(changed or corrupt)")
    return manifest
