"""Build an ``EngramLayer`` with weights: from a reference checkpoint, or seeded random ones.

Checkpoints are ``.safetensors`` or torch ``.pt`` state dicts with the demo's parameter names, with or
without the ``multi_head_embedding.offsets`` buffer, optionally under a prefix (full-model checkpoints).
The layer is built on the meta device first, so a multi-GB table is allocated once.
"""

from __future__ import annotations

import logging
import math
import string
import typing
from pathlib import Path

import torch

from engram_export.core.errors import EngramError
from engram_export.core.resources import require_memory, tensor_bytes
from engram_export.models.config import BOUNDS, EngramConfig, is_int
from engram_export.models.engram import EngramLayer
from engram_export.models.hashing import EngramHashing

__all__ = ["build_layer", "layer_prefix", "read_checkpoint", "random_state_dict"]

log = logging.getLogger(__name__)
OFFSETS = "multi_head_embedding.offsets"


def layer_prefix(prefix: str, layer_id: int) -> str:
    """The checkpoint key prefix of one layer: ``prefix`` with ``{layer}`` replaced by its id.

    ``{layer}`` is the only placeholder; any other (``{lyr}``, ``{}``, a stray brace) is refused, not
    left to a KeyError or to a prefix that matches no key.
    """
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prefix) if field is not None]
        if all(field == "layer" for field in fields):
            return prefix.format(layer=layer_id)
    except ValueError:  # unmatched braces, a bad format spec
        pass
    raise EngramError(
        f"--prefix {prefix!r}: the only placeholder allowed is {{layer}} (write a literal brace as {{{{ or }}}})"
    )


def read_checkpoint(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` (prefix stripped) from a .safetensors or .pt file."""
    path = Path(path)
    if not path.is_file():
        raise EngramError(f"weights: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except (SafetensorError, OSError, ValueError) as exc:
            raise EngramError(f"weights: {path} is not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, UnpicklingError...
        raise EngramError(
            f"weights: {path} is not a readable torch state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngramError(f"weights: {path} does not hold a state dict of tensors")
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def random_state_dict(layer: EngramLayer, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights shaped like the layer's: PyTorch's default init, norms perturbed from 1.

    Norm weights away from 1 make a mix-up between branches or between norm1 and norm2 visible.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in layer.state_dict().items():
        if name == OFFSETS:
            continue
        if name.endswith("embedding.weight"):
            value = torch.randn(param.shape, generator=generator)
        elif "norm" in name:
            value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            weight = name.endswith("weight")
            fan_in = math.prod(param.shape[1:]) if weight else layer.config.engram_hidden_size
            bound = 1 / math.sqrt(fan_in)
            value = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
        state[name] = value
    return state


def _check_state(layer: EngramLayer, state: dict[str, torch.Tensor]) -> None:
    expected = layer.state_dict()
    missing = [k for k in expected if k not in state and k != OFFSETS]
    if missing:
        raise EngramError(
            f"weights: missing tensor(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (wrong --prefix or config?)"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise EngramError(f"weights: unexpected tensor(s) {', '.join(unexpected[:5])} (checkpoint and config disagree)")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise EngramError(
                f"weights: tensor {name} has shape {list(value.shape)}, the config expects {list(expected[name].shape)}"
            )
        if name != OFFSETS and not value.is_floating_point():
            raise EngramError(f"weights: tensor {name} has dtype {value.dtype}, expected a float type")
    if OFFSETS in state and state[OFFSETS].tolist() != layer.hashing.offsets(layer.layer_id):
        raise EngramError(
            f"weights: {OFFSETS} disagrees with the head primes of this config "
            f"(different engram_vocab_size, layer_ids or n_head_per_ngram?)"
        )


def build_layer(
    config: EngramConfig,
    layer_id: int,
    weights: str | Path | None = None,
    prefix: str = "",
    seed: int | None = None,
    hashing: EngramHashing | None = None,
) -> EngramLayer:
    """A float32 layer in eval mode, with weights from ``weights`` or, if None, random from ``seed``."""
    if (weights is None) == (seed is None):
        raise EngramError("give either a weights file or a random-init seed, not both or neither")
    low, high = BOUNDS["seed"]
    if seed is not None and not (is_int(seed) and low <= seed <= high):
        raise EngramError(f"weights: the random-init seed must be an integer in [{low}, {high}], got {seed!r}")
    prefix = layer_prefix(prefix, layer_id)
    hashing = hashing or EngramHashing(config)
    with torch.device("meta"):
        layer = EngramLayer(config, layer_id, hashing)
    table = f"table {hashing.table_rows(layer_id)} rows x {config.head_dim}"
    source = "random" if weights is None else f"{weights}'s"
    require_memory(
        tensor_bytes(layer.state_dict().values()), f"weights: {source} f32 weights of layer {layer_id} ({table})"
    )
    if weights is not None:
        state = read_checkpoint(weights, prefix)
        if not state:
            raise EngramError(f"weights: no tensor in {weights} starts with prefix {prefix!r}")
        _check_state(layer, state)
        # read (safetensors) or memory-mapped (.pt): the cast below copies what is not f32 yet
        require_memory(
            sum(v.numel() * 4 for k, v in state.items() if k != OFFSETS and v.dtype != torch.float32),
            f"weights: casting {weights}'s weights of layer {layer_id} to f32 ({table})",
        )
    else:
        log.info("random weights, seed %d, %s", seed, table)
        state = random_state_dict(layer, typing.cast(int, seed))  # not None: checked above
    state = {k: v.to(torch.float32) for k, v in state.items() if k != OFFSETS}
    state[OFFSETS] = torch.tensor(hashing.offsets(layer_id), dtype=torch.long)
    layer.load_state_dict(state, assign=True)
    layer.compress_lut = torch.from_numpy(hashing.lut)
    return layer.eval().requires_grad_(False)
