"""DeepSeek-V4.1's Engram (model_type ``deepseek_v41``, spec section 8): the PyTorch layer, over the
config and hash of ``deepseek_v41_config.py`` (which need no PyTorch).

What differs from the demo family (``engram.py``): 2..N-grams hashed into ONE table per layer whose
rows are FP8 E4M3 with an E8M0 (power of two) scale per 32 values (or, in other checkpoints, BF16 or
F32 rows without scales, kept as stored); image tokens (``token_mask``
False) block n-grams and get a zero gate; one fused FP8 ``wkv`` projection with 32x32 block scales and
no bias; a gate from unweighted RMS norms and ``q_weight * k_weight``; no short conv; the output
includes the residual, ``h + gate * value``.

The table is never widened in memory: the layer keeps the stored bytes (FP8 and E8M0 scales, or BF16
or F32) and dequantizes or widens only the rows it looks up.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from engram_export.models.deepseek_v41_config import BLOCK, GATE_FLOOR, V41Config, V41Hashing, locate_layer

__all__ = ["V41EngramLayer", "open_layer", "dequantize_rows", "dequantize_blocks"]


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 rows [..., W] with E8M0 scales [..., W/32] -> float32 [..., W]."""
    widened = values.float().unflatten(-1, (-1, BLOCK))
    return (widened * scales.float().unsqueeze(-1)).flatten(-2)


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 [O, I] with one E8M0 scale per 32x32 block, [ceil(O/32), ceil(I/32)] -> float32."""
    out, width = weight.shape
    values = weight.float()
    if out % BLOCK == 0 and width % BLOCK == 0:  # each scale broadcast over its block: no [O, I] of scales
        values.view(out // BLOCK, BLOCK, width // BLOCK, BLOCK).mul_(scale.float()[:, None, :, None])
        return values
    full = scale.float().repeat_interleave(BLOCK, 0)[:out].repeat_interleave(BLOCK, 1)[:, :width]
    return values.mul_(full)


def _mapped(location) -> torch.Tensor:
    """A read-only, file-backed view of a tensor's bytes in its stored dtype (nothing is read until used)."""
    import warnings

    from engram_export.core.checkpoint import torch_dtype

    array = np.memmap(location.file, np.uint8, "r", location.offset, location.nbytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the array is not writable: it is never written
        return torch.from_numpy(array).view(torch_dtype(location.dtype)).view(location.shape)


def open_layer(checkpoint, config: V41Config, layer_id: int, hashing: V41Hashing | None = None):
    """The PyTorch layer of a checkpoint: the table (and its scales) mapped from the shard, not read."""
    located = locate_layer(checkpoint, config, layer_id)
    tensors = {
        suffix: _mapped(location) if suffix.startswith("embed.") else checkpoint.load(location.name)
        for suffix, location in located.items()
    }
    return V41EngramLayer(config, layer_id, tensors, hashing)


class V41EngramLayer(nn.Module):
    """One V4.1 Engram layer: ``forward(input_ids, hidden_states, token_mask) -> h + gate * value``.

    Tensors keep the checkpoint's names and dtypes (``embed.weight`` F8_E4M3 with ``embed.scale``
    F8_E8M0, or ``embed.weight`` BF16 or F32 alone; ``wkv.weight`` F8_E4M3, ``wkv.scale`` F8_E8M0,
    ``q_weight`` and ``k_weight`` BF16).
    """

    def __init__(
        self, config: V41Config, layer_id: int, tensors: dict[str, torch.Tensor], hashing: V41Hashing | None = None
    ):
        super().__init__()
        self.config, self.layer_id = config, layer_id
        self.hashing = hashing or V41Hashing(config)
        self.tensors = tensors  # kept as stored: the table is never widened

    def lookup(self, input_ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized (FP8) or widened (BF16, F32) rows, concatenated: float32 [B, T, C * head_dim]."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None else token_mask
        rows = torch.from_numpy(self.hashing.rows(input_ids.numpy(), mask.numpy(), self.layer_id))
        table = self.tensors["embed.weight"]
        if table.dtype != torch.float8_e4m3fn:
            return table[rows].float().flatten(-2)
        return dequantize_rows(table[rows], self.tensors["embed.scale"][rows]).flatten(-2)

    def fuse(
        self, embeddings: torch.Tensor, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h + gate * value`` from the looked-up rows, in float32 (float64 for float64 hidden states:
        the reference that ``verify`` compares every path with)."""
        config = self.config
        h = hidden_states if hidden_states.dtype == torch.float64 else hidden_states.float()
        weight = dequantize_blocks(self.tensors["wkv.weight"], self.tensors["wkv.scale"]).to(h.dtype)
        kv = embeddings.to(h.dtype) @ weight.T
        key = kv[..., : config.hc_mult * config.hidden_size].unflatten(-1, (config.hc_mult, config.hidden_size))
        value = kv[..., config.hc_mult * config.hidden_size :].unsqueeze(-2)
        w = (self.tensors["q_weight"].float() * self.tensors["k_weight"].float()).to(h.dtype)
        eps = config.rms_norm_eps
        rstd = torch.rsqrt(h.pow(2).mean(-1) + eps) * torch.rsqrt(key.pow(2).mean(-1) + eps)
        dot = (h * w * key).sum(-1) * rstd / math.sqrt(config.hidden_size)
        gate = torch.sigmoid(dot.sign() * dot.abs().clamp_min(GATE_FLOOR).sqrt())
        if token_mask is not None:
            gate = gate * token_mask.unsqueeze(-1)
        return h + gate.unsqueeze(-1) * value

    def forward(
        self, input_ids: torch.Tensor, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.fuse(self.lookup(input_ids, token_mask), hidden_states, token_mask)
