"""The Engram layer in PyTorch, with the reference demo's parameter names (spec sections 4-6).

``forward_vectorized`` batches the hyper-connection branches; ``forward_reference`` keeps the demo's
layout (a projection, two RMSNorms and a gate per branch, a symmetrically padded conv that is cropped)
and is what ``engram-export export`` traces, so the graph passes see the demo's structure. ``forward``
runs one or the other by ``reference_layout``. Both load the demo's state dict unchanged and agree to
float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram_export.models.config import EngramConfig
from engram_export.models.hash_gather import hash_gather
from engram_export.models.hashing import EngramHashing

__all__ = ["EngramLayer", "ShortConv", "MultiHeadEmbedding", "SHORT_CONV_EPS"]

SHORT_CONV_EPS = 1e-5


def _stacked(modules: nn.ModuleList, name: str) -> torch.Tensor:
    """The ``name`` parameter of each module, stacked: [len(modules), ...]."""
    return torch.stack([getattr(module, name) for module in modules])


class MultiHeadEmbedding(nn.Module):
    """One table for all heads; head h's rows start at ``offsets[h]``."""

    def __init__(self, head_sizes: list[int], dim: int):
        super().__init__()
        offsets = [sum(head_sizes[:h]) for h in range(len(head_sizes))]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.embedding = nn.Embedding(sum(head_sizes), dim)


class ShortConv(nn.Module):
    """Per-branch RMSNorm, depthwise causal dilated Conv1d over G*D channels, SiLU."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int):
        super().__init__()
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=SHORT_CONV_EPS) for _ in range(hc_mult))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The demo's form: norms in a loop, symmetric padding, crop to the first T outputs."""
        batch, length, groups, dim = x.shape
        normed = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(groups)], dim=-1)
        y = self.conv(normed.transpose(1, 2))[..., :length]
        return F.silu(y).transpose(1, 2).reshape(batch, length, groups, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batched norms and a left-padded (causal) conv: no outputs computed only to be cropped."""
        batch, length, groups, dim = x.shape
        weight = _stacked(self.norms, "weight")
        normed = F.rms_norm(x, (dim,), eps=SHORT_CONV_EPS) * weight
        left = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0]
        y = F.pad(normed.reshape(batch, length, groups * dim).transpose(1, 2), (left, 0))
        y = F.conv1d(y, self.conv.weight, dilation=self.conv.dilation, groups=groups * dim)
        return F.silu(y).transpose(1, 2).reshape(batch, length, groups, dim)


class EngramLayer(nn.Module):
    """One Engram layer: ``output = value + short_conv(value)`` of shape [B, T, G, D].

    Inputs are raw token ids [B, T] (compressed inside) and the backbone's hyper-connection hidden
    states [B, T, G, D]. The output excludes the backbone's residual add.
    """

    reference_layout: bool

    def __init__(self, config: EngramConfig, layer_id: int, hashing: EngramHashing | None = None):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.reference_layout = False
        self.hashing = hashing or EngramHashing(config)
        self.multipliers = self.hashing.multipliers(layer_id)
        self.primes = self.hashing.primes(layer_id)
        self.register_buffer("compress_lut", torch.from_numpy(self.hashing.lut), persistent=False)
        hidden, groups, width = config.hidden_size, config.hc_mult, config.engram_hidden_size
        self.multi_head_embedding = MultiHeadEmbedding(self.primes, config.head_dim)
        self.short_conv = ShortConv(hidden, config.kernel_size, config.max_ngram_size, groups)
        self.value_proj = nn.Linear(width, hidden)
        self.key_projs = nn.ModuleList(nn.Linear(width, hidden) for _ in range(groups))
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(groups))
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(groups))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hash-gather: embeddings [B, T, E] of raw ids [B, T]."""
        return hash_gather(
            input_ids,
            self.compress_lut,
            self.multi_head_embedding.embedding.weight,
            self.multipliers,
            self.primes,
            self.hashing.pad_id,
            self.config.n_head_per_ngram,
        )

    def forward_reference(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The demo's forward, branch by branch."""
        embeddings = self.embed(input_ids)
        gates = []
        for i in range(self.config.hc_mult):
            key = self.norm1[i](self.key_projs[i](embeddings))
            query = self.norm2[i](hidden_states[:, :, i, :])
            gate = (key * query).sum(dim=-1) / math.sqrt(self.config.hidden_size)
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(embeddings).unsqueeze(2)
        return value + self.short_conv.forward_reference(value)

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.reference_layout:
            return self.forward_reference(input_ids, hidden_states)
        return self.forward_vectorized(input_ids, hidden_states)

    def forward_vectorized(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """All branches at once: one key projection [G, D, E], batched norms and gates."""
        embeddings = self.embed(input_ids)
        dim = self.config.hidden_size
        key_weight = _stacked(self.key_projs, "weight")
        key_bias = _stacked(self.key_projs, "bias")
        keys = torch.einsum("bte,gde->btgd", embeddings, key_weight) + key_bias
        keys = F.rms_norm(keys, (dim,)) * _stacked(self.norm1, "weight")
        query = F.rms_norm(hidden_states, (dim,)) * _stacked(self.norm2, "weight")
        gate = (keys * query).sum(dim=-1) / math.sqrt(dim)
        gate = torch.sigmoid(gate.abs().clamp_min(1e-6).sqrt() * gate.sign())
        value = gate.unsqueeze(-1) * self.value_proj(embeddings).unsqueeze(2)
        return value + self.short_conv(value)
