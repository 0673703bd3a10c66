"""What an exported file says about itself: the config and layer it was made from, and its precision.

Stored as ONNX ``metadata_props`` and carried into the OpenVINO IR's ``rt_info`` by ``compile``, so
every later step (compile, run, verify) knows the shapes and id range to check without side files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engram_export.errors import EngramError
from engram_export.models.config import EngramConfig

__all__ = ["ModelInfo", "PRECISIONS"]

PRECISIONS = ("f32", "bf16")

CONFIG_KEY = "engram.config"
LAYER_KEY = "engram.layer_id"
NUM_IDS_KEY = "engram.num_ids"
PRECISION_KEY = "engram.precision"
QUANTIZATION_KEY = "engram.quantization"
RT_INFO_SECTION = "engram_export"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The config and layer a model computes, how many raw ids it takes, its inference precision
    and, for NNCF-quantized IR, the quantization mode."""

    config: EngramConfig
    layer_id: int
    num_ids: int  # length of the compression table: valid ids are [0, num_ids) and negatives
    precision: str = "f32"
    quantization: str | None = None

    def to_metadata(self) -> dict[str, str]:
        metadata = {CONFIG_KEY: json.dumps(self.config.to_dict()), LAYER_KEY: str(self.layer_id),
                    NUM_IDS_KEY: str(self.num_ids), PRECISION_KEY: self.precision}
        if self.quantization:
            metadata[QUANTIZATION_KEY] = self.quantization
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str | Path) -> "ModelInfo":
        if any(key not in metadata for key in (CONFIG_KEY, LAYER_KEY, NUM_IDS_KEY)):
            raise EngramError(f"{source} was not exported by engram-export (no Engram metadata)")
        config = EngramConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
        return cls(config, int(metadata[LAYER_KEY]), int(metadata[NUM_IDS_KEY]),
                   metadata.get(PRECISION_KEY, "f32"), metadata.get(QUANTIZATION_KEY))

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelInfo":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise EngramError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
        return cls.from_metadata({p.key: p.value for p in model.metadata_props}, path)

    @classmethod
    def from_openvino(cls, model, path: str | Path) -> "ModelInfo":
        metadata = {}
        for key in (CONFIG_KEY, LAYER_KEY, NUM_IDS_KEY, PRECISION_KEY, QUANTIZATION_KEY):
            if model.has_rt_info([RT_INFO_SECTION, key]):
                metadata[key] = model.get_rt_info([RT_INFO_SECTION, key]).astype(str)
        return cls.from_metadata(metadata, path)

    def write_openvino(self, model) -> None:
        for key, value in self.to_metadata().items():
            model.set_rt_info(value, [RT_INFO_SECTION, key])
