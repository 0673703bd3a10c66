"""The released engines' own Engram code on CPU: vLLM 0.33.0 and SGLang 0.5.23 in ``.venv-engines``
(``bash engines/install.sh``; run ``.venv-engines/bin/python -m pytest tests/engines``). The main ``.venv``
has neither engine, and ``tests/conftest.py`` leaves this folder out there.

First thing, before anything imports vLLM or triton: ``CUDA_VISIBLE_DEVICES=""`` and ``TRITON_INTERPRET=1``
(the engines' Triton kernels run in the interpreter on CPU tensors) and the import-only ``torchvision`` stub
SGLang needs (``tests/engines/shims.py``).

Fixtures:

- ``vllm_engram``: the module ``vllm.models.deepseek_v41.common.engram``, patched for the test as TP rank 0
  of 1 on a GPU with 4 SMs (``tests.engines.helpers.vllm_tp``), its kernels checked to be interpreted.
- ``sglang_engram``: the module ``sglang.srt.layers.engram``, SGLang's parallel context stamped TP rank 0 of
  1 for the test and cleared after it.
- ``make_vllm_embedding`` / ``make_sglang_embedding``: ``tests.engines.helpers``' constructors
  (``(num_embeddings, dim, head_sizes | column_bounds, tp_size=1, tp_rank=0)``), the SGLang stamp cleared
  after the test.
- ``engine_hash_ids``: ``(config, token_map, sequences, starts=None) -> (vLLM int32, SGLang int64)`` ids
  ``[tokens, layers, (n-1)*heads]`` from vLLM's Triton kernel and SGLang's ``compute_engram_hash_ids``.
"""

import importlib.util
from pathlib import Path

from tests.engines.shims import install_cpu_shims

ENGINES = all(importlib.util.find_spec(name) for name in ("vllm", "sglang"))
if ENGINES:
    install_cpu_shims()

import pytest  # noqa: E402

from tests.engines import helpers  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Named on the command line of a venv without the engines (the main ``.venv``): skipped, not errors."""
    if ENGINES:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="vLLM and SGLang are installed in .venv-engines only (engines/install.sh)")
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture
def vllm_engram():
    with helpers.vllm_tp(tp_size=1, tp_rank=0) as engram:
        assert type(engram._engram_lookup_kernel).__name__ == "InterpretedFunction", (
            "vLLM's Triton kernels are not interpreted: CUDA_VISIBLE_DEVICES/TRITON_INTERPRET were set too late"
        )
        yield engram


@pytest.fixture
def sglang_engram():
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(tp_size=1, tp_rank=0)
    yield helpers.sglang_engram_module()
    helpers.sglang_parallel_reset()


@pytest.fixture
def make_vllm_embedding():
    return helpers.make_vllm_embedding


@pytest.fixture
def make_sglang_embedding():
    yield helpers.make_sglang_embedding
    helpers.sglang_parallel_reset()


@pytest.fixture
def engine_hash_ids():
    def both(config, token_map, sequences, starts=None):
        return (
            helpers.vllm_hash_ids(config, token_map, sequences, starts),
            helpers.sglang_hash_ids(config, token_map, sequences, starts),
        )

    return both


@pytest.fixture(scope="session")
def v41(tmp_path_factory):
    """A tiny DeepSeek-V4.1 checkpoint (FP8 tables, the real BERT tokenizer) and engram-export's export of
    it (``tests.engines.helpers.v41_checkpoint``): the engines load the checkpoint, the plug-ins the folder."""
    return helpers.v41_checkpoint(tmp_path_factory.mktemp("v41"))
