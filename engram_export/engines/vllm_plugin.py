"""vLLM 0.33.0 (``vllm.general_plugins`` entry point ``engram_export``): DeepSeek-V4.1's Engram rows
from engram-export's row API instead of a host table.

``register`` (called by ``vllm.plugins.load_general_plugins`` in every vLLM process) does nothing unless
``ENGRAM_EXPORT_ROWS`` is set (``settings.py``). Then it checks the settings (a missing folder, a bad
option, a ``ray://`` name not served is refused there, at engine start, in every process; the tables
themselves are opened by the processes that build the model, when they do) and replaces, in
``vllm/models/deepseek_v41/common/engram.py``:

- ``ParallelEngramEmbedding._allocate_weights``: the table and scales are meta tensors, no memory;
- ``Engram._create_embedding``: the embedding of layer ``layout.layer_ids[i]`` is bound to that layer's
  rows (refused in one line if the folder's table is not the one the model would hold there), and its
  table is no parameter of the model: the checkpoint's tables are skipped before they are read
  (``weight_utils.should_skip_weight``), never loaded;
- ``ParallelEngramEmbedding.lookup(indices, out, background)``: the rank's hash columns read through the
  row API into ``out``, for both of its forms (bf16 ``[T, heads, dim]``; packed uint8 rows of dim FP8
  codes + dim/32 E8M0 bytes, heads contiguous, any token stride); ids outside the rank's rows and -1 give
  zero rows as vLLM's kernel does; bf16 decodes scale bytes as vLLM's kernel does (``e8m0="vllm"``);
- ``ParallelEngramEmbedding._storage``: refused in one line (the GB200 peer exchange reads raw table
  memory, which the plug-in does not have).

A lookup inside a CUDA graph capture is refused in one line: vLLM runs its offloaded lookup eagerly between
captured segments (``eager_break_during_capture``), but not with ``cpu_offload=False`` or in cudagraph mode
FULL, and a graph cannot replay a host read.

The checkpoint's tables are skipped unread by vLLM's default loader (``safetensors_weights_iterator``, its
default lazy strategy) only. Its ``eager`` and ``prefetch`` strategies read whole files first; the other
load formats (``fastsafetensors``, ``instanttensor``, ``enable_multithread_load``) call no
``should_skip_weight`` and hand the tables to the model, which has no parameter for them (a ``KeyError``).

A replaced method whose signature differs from 0.33.0's is refused at ``register``, naming it.
"""

from __future__ import annotations

import logging

from engram_export.engines import settings

__all__ = ["register", "ENGRAM_MODULE", "REPLACED"]

log = logging.getLogger(__name__)

ENGRAM_MODULE = "vllm.models.deepseek_v41.common.engram"
WEIGHT_UTILS = "vllm.model_executor.model_loader.weight_utils"
TABLE_NAMES = (".engram.embed.weight", ".engram.embed.scale")  # the checkpoint's tables
# what the plug-in replaces, with the parameters it was written against (vLLM 0.33.0)
REPLACED = {
    "ParallelEngramEmbedding.__init__": (
        "self",
        "num_embeddings",
        "dim",
        "head_sizes",
        "block_size",
        "cpu_offload",
        "dp_shared_memory",
        "use_thp",
    ),
    "ParallelEngramEmbedding._allocate_weights": ("self",),
    "ParallelEngramEmbedding.lookup": ("self", "indices", "out", "background"),
    "ParallelEngramEmbedding._storage": ("self",),
    "Engram._create_embedding": ("self", "layout", "layer_hash_index"),
    "should_skip_weight": ("weight_name", "local_expert_ids"),
}


def register() -> None:
    """The entry point: inert without ``ENGRAM_EXPORT_ROWS``; else the settings checked and vLLM patched."""
    if not settings.configured():
        return
    import importlib

    engram = importlib.import_module(ENGRAM_MODULE)
    weight_utils = importlib.import_module(WEIGHT_UTILS)
    targets = {name: _resolve(engram, name) for name in REPLACED if name != "should_skip_weight"}
    targets["should_skip_weight"] = weight_utils.should_skip_weight
    for name, function in targets.items():
        settings.check_signature(function, REPLACED[name], name, "vLLM")
    settings.check()  # what opening would refuse first, now, in every process; opened where the model is built
    _patch(engram, weight_utils)
    log.info("engram-export serves the Engram rows from %s", settings.settings()["rows"])


def _resolve(module, dotted: str):
    owner, _, attribute = dotted.partition(".")
    return getattr(getattr(module, owner), attribute)


def _patch(engram, weight_utils) -> None:
    embedding_class, engram_class = engram.ParallelEngramEmbedding, engram.Engram
    if getattr(embedding_class, "_engram_export", False):
        return  # patched already in this process
    create_embedding, skip_weight = engram_class._create_embedding, weight_utils.should_skip_weight

    def bound_embedding(self, layout, layer_hash_index):
        return bind(create_embedding(self, layout, layer_hash_index), layout, layer_hash_index)

    def should_skip_weight(weight_name, local_expert_ids):
        return weight_name.endswith(TABLE_NAMES) or skip_weight(weight_name, local_expert_ids)

    embedding_class._allocate_weights = allocate_weights
    embedding_class.lookup = lookup
    embedding_class._storage = storage
    engram_class._create_embedding = bound_embedding
    weight_utils.should_skip_weight = should_skip_weight
    embedding_class._engram_export = True


def allocate_weights(self):
    """``ParallelEngramEmbedding._allocate_weights``: the table's shapes on the meta device, no memory."""
    import torch

    scale_dim = self.dim // self.block_size
    return (
        torch.empty(self.part_num_embeddings, self.dim, dtype=torch.float8_e4m3fn, device="meta"),
        torch.empty(self.part_num_embeddings, scale_dim, dtype=torch.uint8, device="meta"),
    )


def bind(embedding, layout, layer_hash_index: int):
    """``embedding`` (of layer ``layout.layer_ids[layer_hash_index]``) bound to that layer's rows, after
    checking them; its table made no parameter (nothing to load, nothing loaded)."""
    layer_id = layout.layer_ids[layer_hash_index]
    head_sizes = tuple(size for order in layout.primes[layer_hash_index] for size in order)
    embedding._engram_rows = settings.layer_rows(layer_id, embedding.num_embeddings, embedding.dim, head_sizes)
    for name in ("weight", "weight_scale_inv"):
        table = embedding._parameters.pop(name)
        setattr(embedding, name, table.data)
    return embedding


def lookup(self, indices, out, background=False):
    """``ParallelEngramEmbedding.lookup``: this rank's hash columns of ``indices`` [T, all columns], read
    through the row API into ``out`` as vLLM's kernel writes it (packed uint8 or bf16 [T, heads, ...])."""
    import torch

    tokens = indices.shape[0]
    if not tokens * self.part_n_hash_cols:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise _captured()
    columns = min(self.part_n_hash_cols, self.n_hash_cols - self.head_start)  # a last rank's padded heads
    ids = indices[:, self.head_start : self.head_start + columns]
    form = "packed" if out.dtype == torch.uint8 else "bf16"
    owned = (self.vocab_start_idx, self.vocab_end_idx)
    target = out if out.dim() == 3 else out.view(tokens, self.part_n_hash_cols, -1)
    if out.is_cuda:  # rows read into pinned host memory, then copied on the current (prefetch) stream
        staged = torch.empty((tokens, columns, target.shape[-1]), dtype=out.dtype, pin_memory=True)
        self._engram_rows.read(ids.to("cpu").contiguous(), staged, form=form, owned=owned, e8m0="vllm")
        target[:, :columns].copy_(staged, non_blocking=True)
    else:
        self._engram_rows.read(ids.contiguous(), target[:, :columns], form=form, owned=owned, e8m0="vllm")
    if columns < self.part_n_hash_cols:
        target[:, columns:].zero_()


def _captured():
    from engram_export.core.errors import EngramError

    return EngramError(
        "engram-export plug-in: vLLM is capturing the Engram lookup in a CUDA graph (cpu_offload=False, or "
        "cudagraph mode FULL); its rows are read on the host, which a graph cannot replay: run with "
        "cpu_offload (vLLM's default) and a cudagraph mode that runs the lookup eagerly, or --enforce-eager"
    )


def storage(self):
    """``ParallelEngramEmbedding._storage``: refused (the GB200 peer exchange reads raw table memory)."""
    from engram_export.core.errors import EngramError

    raise EngramError(
        "engram-export plug-in: this path reads the raw table memory (the GB200 DP peer exchange); "
        "with ENGRAM_EXPORT_ROWS the rows come through lookup only: run without it"
    )
