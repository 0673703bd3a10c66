"""Hugging Face style checkpoint folders, read without reading the tables.

A folder holds ``config.json``, ``tokenizer.json`` and safetensors shards, listed by
``model.safetensors.index.json`` (or one ``model.safetensors``). A tensor is *located* from the
shard's header alone: its file, byte offset, dtype and shape; nothing else of the shard is read, so
a 94 GiB table costs the same as a small one. Small tensors are then loaded through ``safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from functools import cached_property
from pathlib import Path

import torch

from engram_export.core.errors import EngramError

__all__ = ["Checkpoint", "TensorLocation", "read_header", "torch_dtype", "DTYPE_BYTES"]

INDEX, SINGLE, CONFIG = "model.safetensors.index.json", "model.safetensors", "config.json"
DTYPE_BYTES = {
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "U8": 1,
    "I8": 1,
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "I32": 4,
    "I64": 8,
    "F64": 8,
    "BOOL": 1,
    "U16": 2,
    "I16": 2,
    "U32": 4,
    "U64": 8,
}
MAX_HEADER = 100 << 20


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name."""
    return {
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E8M0": torch.float8_e8m0fnu,
        "U8": torch.uint8,
        "I8": torch.int8,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F32": torch.float32,
        "I32": torch.int32,
        "I64": torch.int64,
        "F64": torch.float64,
        "BOOL": torch.bool,
    }[name]


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: ``nbytes`` bytes at ``offset`` of ``file``."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorLocation]:
    """Every tensor of a safetensors file, checked to lie inside the file (a truncated shard is
    refused here, before anything reads it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise EngramError(f"checkpoint: {path} is not a readable safetensors file ({exc})") from exc
    start, tensors = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise EngramError(f"checkpoint: {path}: malformed entry for {name} ({exc!r})") from exc
        if end - begin != expected or begin < 0:
            raise EngramError(
                f"checkpoint: {path}: {name} holds {end - begin} bytes, its dtype and shape need {expected}"
            )
        if start + end > size:
            raise EngramError(
                f"checkpoint: {path} is truncated: {name} ends at byte {start + end}, the file has {size}"
            )
        tensors[name] = TensorLocation(name, path, start + begin, expected, dtype, shape)
    return tensors


class Checkpoint:
    """A checkpoint folder: its config, and where each tensor is."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EngramError(f"checkpoint: {self.folder} is not a folder")
        config = self.folder / CONFIG
        if not config.is_file():
            raise EngramError(f"checkpoint: {self.folder} has no {CONFIG}")
        try:
            self.config = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngramError(f"checkpoint: {config} is not valid JSON ({exc})") from exc
        if not isinstance(self.config, dict):
            raise EngramError(f"checkpoint: {config} does not hold a JSON object")
        self._headers: dict[Path, dict[str, TensorLocation]] = {}

    @cached_property
    def _files(self) -> dict[str, Path]:
        """Tensor name -> shard, from the index (or the one shard)."""
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self._shard(file) for name, file in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise EngramError(f"checkpoint: {index} is not a valid index ({exc!r})") from exc
        single = self.folder / SINGLE
        if not single.is_file():
            raise EngramError(f"checkpoint: {self.folder} has neither {INDEX} nor {SINGLE}")
        return dict.fromkeys(read_header(single), single)

    def _shard(self, name) -> Path:
        if not isinstance(name, str) or Path(name).name != name:
            raise EngramError(f"checkpoint: the index names {name!r}, not a file in {self.folder}")
        return self.folder / name

    def find(self, names: list[str]) -> str:
        """The first of ``names`` the checkpoint holds (the same tensor with or without ``model.``)."""
        for name in names:
            if name in self._files:
                return name
        raise EngramError(f"checkpoint: {self.folder} holds no tensor {' or '.join(names)}")

    def locate(self, name: str) -> TensorLocation:
        file = self._files[name]
        if file not in self._headers:
            if not file.is_file():
                raise EngramError(f"checkpoint: shard {file.name} of {name} is missing from {self.folder}")
            self._headers[file] = read_header(file)
        if name not in self._headers[file]:
            raise EngramError(f"checkpoint: the index puts {name} in {file.name}, which does not hold it")
        return self._headers[file][name]

    def load(self, name: str):
        """A (small) tensor as a torch tensor in its stored dtype, read from its bytes alone (mapping the
        whole shard, as ``safetensors`` does, fails for shards larger than the address-space limit)."""
        location = self.locate(name)
        try:
            with open(location.file, "rb") as f:
                data = os.pread(f.fileno(), location.nbytes, location.offset)
        except OSError as exc:
            raise EngramError(f"checkpoint: cannot read {name} from {location.file} ({exc.strerror})") from exc
        if len(data) != location.nbytes:
            raise EngramError(f"checkpoint: {location.file} is truncated inside {name}")
        dtype = torch_dtype(location.dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(location.shape)
