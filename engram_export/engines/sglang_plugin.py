"""SGLang 0.5.23 (``sglang.srt.plugins`` entry point ``engram_export``): DeepSeek-V4.1's Engram rows from
engram-export's row API instead of a table in GPU or host memory.

``register`` (called by ``sglang.srt.plugins.load_plugins`` in every SGLang process) does nothing unless
``ENGRAM_EXPORT_ROWS`` is set (``settings.py``). Then it checks the settings (a missing folder, a bad
option, a ``ray://`` name not served is refused there, in every process; the tables themselves are opened
by the processes that build the model, at their first ``EngramEmbedding``: SGLang's front end, its
tokenizer and detokenizer processes, hold none) and registers with SGLang's ``HookRegistry``:

- ``EngramEmbedding.__init__`` (REPLACE): the rank's row range as SGLang's ``shard_range`` gives it, no
  table allocated (neither GPU, host nor peer memory; ``weight`` and ``scale`` are placeholders of the
  table's shape over one row of memory, and no parameters: nothing is loaded), bound to the folder's
  layer ``layer_id`` (refused in one line if its table is not the one the model would hold there);
- ``EngramEmbedding._owned_rows`` (REPLACE): the rank's rows read through the row API in bf16, zero for
  ids it does not own and -1, as SGLang's own CPU path gives them;
- ``EngramRowStager._gather`` (AROUND): SGLang's scheduler-side staging (``SGLANG_OPT_DSV41_ENGRAM_HOST_
  STAGING``, on a GPU) gathers codes and scales apart through the row API;
- ``weight_utils.buffered_multi_thread_safetensors_weights_iterator`` (what SGLang's loader uses by
  default) and ``safetensors_weights_iterator`` (without threads, or with prefetch) (AROUND): the
  checkpoint's tables are skipped before they are read. Other load formats (fastsafetensors, runai, ...)
  still read them; the model then drops them ("not found in params_dict").

SGLang logs a plug-in's error and goes on; so that a bad folder or a changed SGLang never serves its own
(or no) table silently, every failure of ``register`` also makes ``EngramEmbedding.__init__`` raise it:
the model is refused at engine start.
"""

from __future__ import annotations

import logging

from engram_export.engines import settings

__all__ = ["register", "REPLACED"]

log = logging.getLogger(__name__)

ENGRAM_MODULE = "sglang.srt.layers.engram"
STAGING_MODULE = "sglang.srt.layers.engram_staging"
WEIGHT_UTILS = "sglang.srt.model_loader.weight_utils"
TABLE_NAMES = (".engram.embed.weight", ".engram.embed.scale")  # the checkpoint's tables
REPLACED = {
    f"{ENGRAM_MODULE}.EngramEmbedding.__init__": ("self", "num_embeddings", "dim", "layer_id", "column_bounds"),
    f"{ENGRAM_MODULE}.EngramEmbedding._owned_rows": ("self", "indices"),
    f"{STAGING_MODULE}.EngramRowStager._gather": ("self", "table", "ids"),
    f"{WEIGHT_UTILS}.safetensors_weights_iterator": (
        "hf_weights_files",
        "disable_mmap",
        "prefetch",
        "prefetch_num_threads",
        "drop_cache_after_load",
    ),
    f"{WEIGHT_UTILS}.buffered_multi_thread_safetensors_weights_iterator": (
        "hf_weights_files",
        "max_workers",
        "disable_mmap",
        "prefetch",
        "prefetch_num_threads",
        "drop_cache_after_load",
    ),
}
ITERATORS = [target for target in REPLACED if target.startswith(WEIGHT_UTILS)]  # the checkpoint's readers
_placeholders: dict[int, tuple] = {}  # data_ptr of a placeholder table -> (LayerRows, form)


def register() -> None:
    """The entry point: inert without ``ENGRAM_EXPORT_ROWS``; else SGLang's hooks registered."""
    if not settings.configured():
        return
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    init_target = f"{ENGRAM_MODULE}.EngramEmbedding.__init__"
    try:
        for target, parameters in REPLACED.items():
            owner, _, name = target.rpartition(".")
            settings.check_signature(getattr(pkgutil.resolve_name(owner), name), parameters, name, "SGLang")
        HookRegistry.register(init_target, _init, HookType.REPLACE)
        HookRegistry.register(f"{ENGRAM_MODULE}.EngramEmbedding._owned_rows", _owned_rows, HookType.REPLACE)
        HookRegistry.register(f"{STAGING_MODULE}.EngramRowStager._gather", _gather, HookType.AROUND)
        for iterator in ITERATORS:
            HookRegistry.register(iterator, _skip_tables, HookType.AROUND)
        settings.check()  # what opening would refuse first, now, in every process; opened where the model is built
    except Exception as exc:
        HookRegistry.register(init_target, _refuse(exc), HookType.REPLACE)
        raise
    log.info("engram-export serves the Engram rows from %s", settings.settings()["rows"])


def _refuse(error: Exception):
    def refused(*args, **kwargs):
        raise error

    return refused


def _init(self, num_embeddings: int, dim: int, layer_id: int, column_bounds: tuple[int, ...]) -> None:
    import pkgutil

    import torch
    from torch import nn

    engram = pkgutil.resolve_name(ENGRAM_MODULE)
    nn.Module.__init__(self)
    parallel = engram.get_parallel()
    self.dim, self.tp_size = dim, parallel.tp_size
    self.row_start, row_end = engram.shard_range(num_embeddings, column_bounds, parallel.tp_rank, self.tp_size)
    self.rows = row_end - self.row_start
    self.host_table, self.peer = None, None
    self._sort_host_reads, self.staged_by_scheduler = False, False
    primes = tuple(b - a for a, b in zip(column_bounds, column_bounds[1:], strict=False))
    self._engram_rows = settings.layer_rows(layer_id, num_embeddings, dim, primes)
    # the table's shape over one row of memory: what reads the table's shape (the stager) sees it
    codes = torch.zeros(1, dim, dtype=torch.uint8).expand(num_embeddings, dim).view(torch.float8_e4m3fn)
    blocks = dim // engram.FP8_BLOCK_SIZE
    scales = torch.zeros(1, blocks, dtype=torch.uint8).expand(num_embeddings, blocks).view(torch.float8_e8m0fnu)
    self.weight, self.scale = codes, scales
    _placeholders[codes.data_ptr()] = (self._engram_rows, "codes")
    _placeholders[scales.data_ptr()] = (self._engram_rows, "scales")
    self.__class__ = _served(type(self))


def _served(cls):
    """``cls`` with the stager's condition answered for rows the plug-in serves: every row is readable
    here, as from SGLang's shared host table, so the scheduler may stage them when SGLang is told to."""
    if getattr(cls, "_engram_export", False):
        return cls
    import pkgutil

    envs = pkgutil.resolve_name("sglang.srt.environ").envs

    class Served(cls):
        _engram_export = True

        @property
        def shared_host_table_without_ats(self) -> bool:
            return bool(envs.SGLANG_OPT_DSV41_ENGRAM_HOST_STAGING.get())

        def finish_load(self, label: str) -> None:
            return None

    Served.__name__ = Served.__qualname__ = cls.__name__
    return Served


def _owned_rows(self, indices):
    import torch

    out = self.new_rows(indices)
    owned = (self.row_start, self.row_start + self.rows)
    if indices.is_cuda:  # read into pinned host memory, copied on the current stream
        staged = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self._engram_rows.read(indices.to("cpu").contiguous(), staged, form="bf16", owned=owned)
        out.copy_(staged, non_blocking=True)
    else:
        self._engram_rows.read(indices.contiguous(), out, form="bf16", owned=owned)
    return out


def _gather(original, self, table, ids):
    served = _placeholders.get(table.data_ptr())
    if served is None:
        return original(self, table, ids)
    import torch

    layer, form = served
    out = torch.empty((ids.numel(), table.shape[1]), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    layer.read(ids.reshape(-1).contiguous(), out, form=form)
    return out


def _skip_tables(original, hf_weights_files, *args, **kwargs):
    """SGLang's iterator over the files without an Engram table (each run of them in one call, so the
    multi-threaded one still reads them in parallel); a file with a table is read here without it, in
    the files' order."""
    import safetensors

    run = []
    for file in hf_weights_files:
        with safetensors.safe_open(file, framework="pt", device="cpu") as opened:
            names = list(opened.keys())
        if not any(name.endswith(TABLE_NAMES) for name in names):
            run.append(file)
            continue
        if run:
            yield from original(run, *args, **kwargs)
            run = []
        with safetensors.safe_open(file, framework="pt", device="cpu") as opened:
            for name in names:
                if not name.endswith(TABLE_NAMES):
                    yield name, opened.get_tensor(name)
    if run:
        yield from original(run, *args, **kwargs)
