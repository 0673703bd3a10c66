"""What an exported file says about itself: the config and layer it was made from, and its precision.

Stored as ONNX ``metadata_props`` and carried into the OpenVINO IR's ``rt_info`` by ``compile``, so
every later step (compile, run, verify) knows the shapes and id range to check without side files.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks, fingerprint
from engram_export.models.config import EngramConfig, config_from_dict, is_deepseek_v41

__all__ = ["ModelInfo", "PRECISIONS"]

PRECISIONS = ("f32", "bf16")

CONFIG_KEY = "engram.config"
LAYER_KEY = "engram.layer_id"
NUM_IDS_KEY = "engram.num_ids"
PRECISION_KEY = "engram.precision"
QUANTIZATION_KEY = "engram.quantization"
RT_INFO_SECTION = "engram_export"
EXTERNAL_DATA_KEY = "engram.external_data"  # JSON: data file -> {size, sampled_sha256}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The config and layer a model computes, how many raw ids it takes, its inference precision
    and, for NNCF-quantized IR, the quantization mode."""

    config: EngramConfig
    layer_id: int
    num_ids: int  # length of the compression table: valid ids are [0, num_ids) and negatives
    precision: str = "f32"
    quantization: str | None = None

    @property
    def takes_mask(self) -> bool:
        """DeepSeek-V4.1 models take a ``token_mask`` (False: image token)."""
        return is_deepseek_v41(self.config)

    def to_metadata(self) -> dict[str, str]:
        metadata = {
            CONFIG_KEY: json.dumps(self.config.to_dict()),
            LAYER_KEY: str(self.layer_id),
            NUM_IDS_KEY: str(self.num_ids),
            PRECISION_KEY: self.precision,
        }
        if self.quantization:
            metadata[QUANTIZATION_KEY] = self.quantization
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str | Path) -> ModelInfo:
        if any(key not in metadata for key in (CONFIG_KEY, LAYER_KEY, NUM_IDS_KEY)):
            raise EngramError(f"{source} was not exported by engram-export (no Engram metadata)")
        try:
            config = config_from_dict(json.loads(metadata[CONFIG_KEY]))
            info = cls(
                config,
                int(metadata[LAYER_KEY]),
                int(metadata[NUM_IDS_KEY]),
                metadata.get(PRECISION_KEY, "f32"),
                metadata.get(QUANTIZATION_KEY),
            )
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise EngramError(f"{source}: malformed Engram metadata ({exc})") from exc
        if info.layer_id not in config.layer_ids:
            raise EngramError(
                f"{source}: metadata says layer {info.layer_id}, which is not one of the "
                f"config's layer_ids {list(config.layer_ids)}"
            )
        if not 1 <= info.num_ids < 2**31 or info.precision not in PRECISIONS:
            raise EngramError(
                f"{source}: malformed Engram metadata (num_ids {info.num_ids}, precision {info.precision!r})"
            )
        return info

    def check_inputs_shape(self, shapes: dict[str, list], source: str | Path) -> None:
        """Refuse a graph whose inputs disagree with this metadata (``shapes``: input name -> dims,
        ``None`` for a dynamic one)."""
        expected: dict[str, list] = {
            "input_ids": [None, None],
            "hidden_states": [None, None, self.config.hc_mult, self.config.hidden_size],
        }
        if self.takes_mask:
            expected["token_mask"] = [None, None]
        for name, dims in expected.items():
            got = shapes.get(name)
            if (
                got is None
                or len(got) != len(dims)
                or any(d is not None and g != d for g, d in zip(got, dims, strict=True))
            ):
                raise EngramError(
                    f"{source}: the graph's {name} is {got}, its metadata says "
                    f"{['?' if d is None else d for d in dims]} (file and metadata disagree)"
                )

    @classmethod
    def from_onnx(cls, model, path: str | Path, checks=None) -> ModelInfo:
        """The info of an exported ``onnx_ir.Model`` read from ``path``, after checking that its inputs
        match the metadata and its external data files are the ones it was written with (to the depth
        of ``checks``, an ``integrity.FileChecks``)."""
        metadata = dict(model.metadata_props)
        info = cls.from_metadata(metadata, path)
        _check_external_data(external_locations(model), metadata.get(EXTERNAL_DATA_KEY), Path(path), checks)
        info.check_inputs_shape(
            {
                value.name: [d if isinstance(d, int) else None for d in value.shape or ()]
                for value in model.graph.inputs
            },
            path,
        )
        return info

    @classmethod
    def from_openvino(cls, model, path: str | Path) -> ModelInfo:
        metadata = {}
        for key in (CONFIG_KEY, LAYER_KEY, NUM_IDS_KEY, PRECISION_KEY, QUANTIZATION_KEY):
            if model.has_rt_info([RT_INFO_SECTION, key]):
                metadata[key] = model.get_rt_info([RT_INFO_SECTION, key]).astype(str)
        info = cls.from_metadata(metadata, path)
        info.check_inputs_shape(
            {
                p.get_friendly_name(): [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
                for p in model.get_parameters()
            },
            path,
        )
        return info

    def write_openvino(self, model) -> None:
        for key, value in self.to_metadata().items():
            model.set_rt_info(value, [RT_INFO_SECTION, key])


def xml_rt_value(xml: Path, key: str) -> str | None:
    """The value of rt_info entry ``key`` read from an IR's .xml text, without OpenVINO reading the
    model (and so before it maps the .bin or needs the tables)."""
    try:
        found = re.search(rf'<{re.escape(key)} value="([^"]*)"', xml.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise EngramError(f"model: cannot read {xml} ({type(exc).__name__})") from exc
    return html.unescape(found[1]) if found else None


def external_locations(model) -> set[str]:
    """The external data files an ``onnx_ir.Model`` reads: the ``location`` of every external tensor,
    initializer or node attribute, in every graph."""
    import onnx_ir as ir  # here: what reads an IR (a runtime, a shard) never loads ONNX

    tensors = [
        value.const_value for graph in (model.graph, *model.graph.subgraphs()) for value in graph.initializers.values()
    ]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        tensors += [a.value for a in node.attributes.values() if a.type == ir.AttributeType.TENSOR]
        tensors += [t for a in node.attributes.values() if a.type == ir.AttributeType.TENSORS for t in a.value]
    return {str(tensor.location) for tensor in tensors if isinstance(tensor, ir.ExternalTensor)}


def external_data_record(model) -> dict:
    """The fingerprints an ``onnx_ir.Model`` records of its external data files (name -> entry; empty
    when it records none: ``ModelInfo.from_onnx`` is where a missing record is refused)."""
    try:
        files = json.loads(model.metadata_props.get(EXTERNAL_DATA_KEY, "{}"))
    except ValueError:
        return {}
    return files if isinstance(files, dict) else {}


def record_external_data(model, folder: Path, known_sha256: dict[str, str] | None = None) -> None:
    """Record in ``model`` (an ``onnx.ModelProto``) the size and sampled SHA-256 of each external data
    file it reads from ``folder`` (checkpoint shards linked beside it: not hashed whole), and the full
    SHA-256 of those in ``known_sha256`` (name -> digest)."""
    import onnx_ir as ir

    for prop in [p for p in model.metadata_props if p.key == EXTERNAL_DATA_KEY]:
        model.metadata_props.remove(prop)
    uses = external_locations(ir.serde.deserialize_model(model))  # wraps the tensors, reads no data
    known = known_sha256 or {}
    files = {name: fingerprint(folder / name, full=False, known_sha256=known.get(name)) for name in sorted(uses)}
    model.metadata_props.add(key=EXTERNAL_DATA_KEY, value=json.dumps(files))


def _check_external_data(uses: set[str], record: str | None, path: Path, checks=None) -> None:
    """Refuse an .onnx whose external data files (``uses``) are not the ones it was written with."""
    checks = checks or FileChecks()
    if not uses:
        return
    try:
        files = json.loads(record or "")
        assert isinstance(files, dict) and all(isinstance(e, dict) for e in files.values())
    except (TypeError, ValueError, AssertionError) as exc:
        raise EngramError(f"{path} records no fingerprint of its external data (export it again)") from exc
    if uses != set(files):
        raise EngramError(f"{path} reads external data from {sorted(uses)}, it records {sorted(files)}")
    for name, entry in files.items():
        if Path(name).name != name:
            raise EngramError(f"{path}: external data {name!r} is not a file beside it")
        checks.check(path.parent / name, entry, str(path))
