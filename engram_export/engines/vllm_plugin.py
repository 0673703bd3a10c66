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
  memory, which the plug-in does not have);
- ``Engram._finish_prefetch(event)``: the layer's rows waited for, then copied to the GPU, before vLLM's
  own wait.

Rows read ahead, as vLLM means them to be: ``Engram._start_prefetch`` issues every Engram layer's lookup
(``background=True``, on its prefetch stream) before the decoder layers run, and ``_finish_prefetch``
waits for one layer's rows when the backbone reaches it. A background lookup returns at once: its ids are
copied to pinned host memory without blocking the host thread, the row API's ``start`` reads the rows
into pinned memory once the copy has landed (``_HostRead``), and the layer's ``_finish_prefetch`` waits
for that read (its wait is what ``recent()`` records) and copies the rows into ``out`` on the current
stream. The host thread that launches the backbone only
waits where the layer needs its rows (layer 1 of V4.1's 40: about 1/40 of a step after the lookups).

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
    "Engram._finish_prefetch": ("self", "event"),
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
    wait_event = engram_class._finish_prefetch.__wrapped__  # vLLM's, inside its eager_break_during_capture

    def bound_embedding(self, layout, layer_hash_index):
        return bind(create_embedding(self, layout, layer_hash_index), layout, layer_hash_index)

    def should_skip_weight(weight_name, local_expert_ids):
        return weight_name.endswith(TABLE_NAMES) or skip_weight(weight_name, local_expert_ids)

    # a break of vLLM's breakable CUDA graphs, as the method it replaces: run eagerly at each replay
    @engram.eager_break_during_capture
    def finish_prefetch(self, event):
        finish_lookup(self.embed_tokens)
        wait_event(self, event)

    embedding_class._allocate_weights = allocate_weights
    embedding_class.lookup = lookup
    embedding_class._storage = storage
    engram_class._create_embedding = bound_embedding
    engram_class._finish_prefetch = finish_prefetch
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
    through the row API into ``out`` as vLLM's kernel writes it (packed uint8 or bf16 [T, heads, ...]).
    ``background`` (vLLM's prefetch): the read is started and ``out`` written at ``finish_lookup``."""
    import torch

    tokens = indices.shape[0]
    if not tokens * self.part_n_hash_cols:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise _captured()
    finish_lookup(self)  # one issued and never waited for: its rows land before this lookup's
    columns = min(self.part_n_hash_cols, self.n_hash_cols - self.head_start)  # a last rank's padded heads
    ids = indices[:, self.head_start : self.head_start + columns]
    form = "packed" if out.dtype == torch.uint8 else "bf16"
    owned = (self.vocab_start_idx, self.vocab_end_idx)
    target = out if out.dim() == 3 else out.view(tokens, self.part_n_hash_cols, -1)
    if background or out.is_cuda:
        read = _HostRead(self._engram_rows, ids, target[:, :columns], form, owned)
        if background:
            self._engram_pending = read
        else:
            read.finish()
    else:
        self._engram_rows.read(ids.contiguous(), target[:, :columns], form=form, owned=owned, e8m0="vllm")
    if columns < self.part_n_hash_cols:  # after the read was accepted: a refused lookup leaves out as it was
        target[:, columns:].zero_()


def finish_lookup(embedding) -> None:
    """Wait for ``embedding``'s background lookup, if one is pending, and copy its rows into its ``out``
    (on the current stream where that is on a GPU). A read that failed raises here, once."""
    read = embedding.__dict__.pop("_engram_pending", None)
    if read is not None:
        read.finish()


class _HostRead:
    """One lookup's rows read on the host, off the calling thread, through the row API's ``start``: the
    ids copied to (pinned) host memory without blocking the caller, read once that copy has landed
    (``ready``), into a host buffer copied into ``target`` at ``finish``. Pinned blocks come from torch's
    host allocator, which reuses none before the copies that use it have run."""

    def __init__(self, rows, ids, target, form: str, owned: tuple[int, int]):
        import torch

        gpu = ids.is_cuda or target.is_cuda
        self.target = target
        host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=gpu)
        host_ids.copy_(ids, non_blocking=gpu)
        ready = None
        if gpu:  # on the current stream (vLLM's prefetch stream, after the hash)
            copied = torch.cuda.Event()
            copied.record()
            ready = copied.synchronize
        staged = torch.empty(target.shape, dtype=target.dtype, pin_memory=gpu)
        self.pending = rows.start(host_ids, staged, form=form, owned=owned, e8m0="vllm", ready=ready)

    def finish(self) -> None:
        self.target.copy_(self.pending.wait(), non_blocking=self.target.is_cuda)


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
