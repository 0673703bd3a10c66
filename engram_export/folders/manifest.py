"""A folder holding every Engram layer of a model, described by ``manifest.json``.

``export`` without ``--layer`` writes one file per layer id plus the manifest; ``compile`` and
``quantize`` map a folder to a folder; ``EngramRuntime(folder)`` serves every layer. The manifest
records the config, each layer's file, the precision or quantization, where the weights came from,
and for every file a layer reads (.xml and .bin, .onnx and its external data) its size, sampled
SHA-256 and full SHA-256 (``core/integrity.py`` says what each check catches). ``read_manifest`` refuses
a folder whose files are missing, outside the folder, unlisted or changed before anything is loaded;
the runtime then checks that each file holds the layer the manifest names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engram_export.contract.model_info import external_data_record, external_locations
from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import staged_output, written_files
from engram_export.core.integrity import FileChecks, file_checks, fingerprint, sha256
from engram_export.models.config import EngramConfig, config_from_dict
from engram_export.models.deepseek_v41_config import V41Config
from engram_export.openvino.tables import table_files

__all__ = ["Manifest", "MANIFEST", "read_manifest", "write_manifest", "model_files", "sha256"]

MANIFEST = "manifest.json"
FORMAT = 2


@dataclasses.dataclass
class Manifest:
    config: EngramConfig | V41Config
    layers: dict[int, str]  # layer id -> file name in the folder (.onnx or .xml)
    kind: str  # "onnx" or "openvino"
    precision: str = "f32"
    quantization: str | None = None
    source: str = ""  # the weights file (with its SHA-256) or "random-init seed N"
    files: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> integrity.fingerprint
    # ``engram-export calibrate``'s report: the hot budget, the text, and per layer its hot set's files
    # (listed in ``files``, so bound like the models) and the held-out hit rate; None: not calibrated
    calibration: dict | None = None

    def hot_set(self, layer_id: int) -> list[str]:
        """The files of a calibrated layer's hot set."""
        if self.calibration is None:
            raise EngramError(
                "table_memory='tiered' needs a calibrated folder: run engram-export calibrate on this one first"
            )
        return list(self.calibration["layers"][str(layer_id)]["files"])


def model_files(folder: Path, name: str) -> list[str]:
    """The names of the files that the model ``name`` reads: itself and its .bin or external data."""
    return list(_model_files(folder, name))


def _model_files(folder: Path, name: str) -> dict[str, str | None]:
    """``model_files``, each with the full SHA-256 the model records for it when that was not hashed
    by us (a checkpoint shard's, from a Hugging Face cache), else None."""
    if name.endswith(".xml"):
        tables = table_files(folder / name)
        return {name: None, name[: -len(".xml")] + ".bin": None, **{t: tables[t].get("sha256") for t in sorted(tables)}}

    import onnx_ir as ir  # here: reading a folder of IR never loads ONNX

    try:
        model = ir.load(folder / name)  # the graph; external data is not read
    except Exception as exc:  # protobuf DecodeError and friends
        raise EngramError(f"{folder / name} is not a readable ONNX file ({type(exc).__name__})") from exc
    recorded = external_data_record(model)
    return {name: None, **{f: recorded.get(f, {}).get("sha256") for f in sorted(external_locations(model))}}


def _check_name(folder: Path, name, where: str) -> None:
    """Refuse a file name that is not a plain name of a file inside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        raise EngramError(f"{where}: {name!r} is not a file name inside the folder")
    if (folder / name).is_symlink():
        raise EngramError(f"{where}: {name} is a symbolic link; the folder must hold its own files")


def write_manifest(folder: Path, manifest: Manifest, known: dict[str, dict] | None = None) -> Path:
    """Fingerprint every file the layers read (and their hot sets) and write ``manifest.json`` (whole or
    not at all). ``known``: fingerprints already checked of files linked unchanged, not hashed again."""

    def own(name: str) -> set[str]:  # the files written with the model (not linked checkpoint shards)
        return {path.name for path in written_files(folder / name)}

    known = known or {}
    hot = [file for layer in (manifest.calibration or {}).get("layers", {}).values() for file in layer["files"]]
    with progress.stage(f"hashing the files of {len(manifest.layers)} layers"):
        manifest.files = {
            file: known[file] if file in known else fingerprint(folder / file, full=file in own(name), known_sha256=sha)
            for name in manifest.layers.values()
            for file, sha in _model_files(folder, name).items()
        }
        manifest.files.update({file: fingerprint(folder / file) for file in hot})
    data = {
        "format": FORMAT,
        "config": manifest.config.to_dict(),
        "kind": manifest.kind,
        "precision": manifest.precision,
        "quantization": manifest.quantization,
        "source": manifest.source,
        "layers": {str(k): v for k, v in manifest.layers.items()},
        "files": manifest.files,
    }
    if manifest.calibration is not None:
        data["calibration"] = manifest.calibration
    with staged_output(folder / MANIFEST) as staged:
        staged.write_text(json.dumps(data, indent=2))
    return folder / MANIFEST


def _parse(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise EngramError(
                f"{path} has format {data.get('format')!r}; this engram-export reads format "
                f"{FORMAT} (export or compile the model again)"
            )
        layers = data["layers"]
        if not isinstance(layers, dict) or not layers:
            raise EngramError(f"{path} lists no layers")
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict)
            and isinstance(e.get("size"), int)
            and isinstance(e.get("sampled_sha256"), str)
            and isinstance(e.get("sha256", ""), str)
            for e in files.values()
        ):
            raise EngramError(f"{path}: every file entry needs a size and a sampled_sha256")
        calibration = data.get("calibration")
        if calibration is not None and not (
            isinstance(calibration, dict)
            and set(calibration["layers"]) == set(layers)
            and all(isinstance(entry["files"], list) and entry["files"] for entry in calibration["layers"].values())
        ):
            raise EngramError(f"{path}: its calibration does not list every layer's hot set files")
        return Manifest(
            config_from_dict(data["config"]),
            {int(k): v for k, v in layers.items()},
            data["kind"],
            data["precision"],
            data["quantization"],
            data["source"],
            files,
            calibration,
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, EngramError):
            raise
        raise EngramError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from exc


def read_manifest(folder: str | Path, check_hashes: bool | str | FileChecks = True) -> Manifest:
    """The folder's manifest, once every file a layer reads is listed, inside the folder, and matches.

    ``check_hashes`` (``integrity.file_checks``): ``True`` (every byte of files up to 1 GiB, larger ones
    by size and sampled SHA-256: the default), ``"full"`` (every byte), ``"sampled"``, ``False`` or
    ``"size"`` (sizes only), or a ``FileChecks``, which then lists the files it did not hash whole.
    """
    checks = file_checks(check_hashes)
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EngramError(f"{folder} has no {MANIFEST} (export the model without --layer)")
    manifest = _parse(path)
    if manifest.kind not in ("onnx", "openvino"):
        raise EngramError(f"{path}: kind must be onnx or openvino, got {manifest.kind!r}")
    suffix = ".onnx" if manifest.kind == "onnx" else ".xml"
    for layer, name in manifest.layers.items():
        _check_name(folder, name, f"{path}, layer {layer}")
        if not name.endswith(suffix):
            raise EngramError(f"{path}: layer {layer}'s file {name} is not an {suffix} file")
    for name in manifest.files:
        _check_name(folder, name, str(path))
    for layer, entry in (manifest.calibration or {}).get("layers", {}).items():
        for name in entry["files"]:
            _check_name(folder, name, f"{path}, hot set of layer {layer}")
            if name not in manifest.files:
                raise EngramError(f"{path}: layer {layer}'s hot set file {name} has no size and hash entry")
    elsewhere = set()  # table files the load does not need here (tables served by shards)
    if checks.tables_elsewhere and manifest.kind == "openvino":
        elsewhere = {file for name in manifest.layers.values() for file in table_files(folder / name)}
    for name, entry in manifest.files.items():
        if name in elsewhere and checks.table_elsewhere(folder / name):
            continue
        checks.check(folder / name, entry, str(path))
    for layer, name in manifest.layers.items():
        if name not in manifest.files:
            raise EngramError(f"{path}: layer {layer}'s file {name} has no size and hash entry")
        for file in model_files(folder, name):
            _check_name(folder, file, f"{path}, layer {layer}")
            if file not in manifest.files:
                raise EngramError(f"{path}: layer {layer} reads {file}, which the manifest does not list")
    return manifest
