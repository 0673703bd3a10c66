#!/usr/bin/env bash
# A second environment, .venv-engines, where the released engine code of vLLM 0.33.0 and SGLang 0.5.23
# imports on a CPU-only machine beside this package, so that tests/engines runs the engines' own Engram
# code against ours:
#
#   bash engines/install.sh            # reuses .venv-engines when it already imports both engines
#   bash engines/install.sh --fresh    # recreates it from scratch
#   .venv-engines/bin/python -m pytest tests/engines
#
# The engine wheels go in with --no-deps: their own requirements are CUDA builds (torch 2.14, torchvision,
# flashinfer, ...). Only the pure-Python packages their import chains need follow, each pinned in
# engines/constraints.txt, which also holds the repo's constraints.txt (torch==2.13.0 among them): without
# it pip swaps torch 2.13.0+cpu for 2.14.1 and GBs of nvidia-* packages. torchvision is never installed
# (PyPI's is a CUDA build that breaks beside torch+cpu): tests/engines/shims.py stubs it for SGLang.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-engines
CONSTRAINTS=engines/constraints.txt
VLLM=vllm==0.33.0
SGLANG=sglang==0.5.23
# vllm.plugins + vllm.models.deepseek_v41.common.engram (each: the first module that needs it)
VLLM_DEPS=(packaging regex pydantic numpy cbor2 psutil pyzmq urllib3 transformers aiohttp requests
  openai-harmony openai pillow pybase64 cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus-client
  xgrammar fastapi partial-json-parser llguidance einops)
# sglang.srt.plugins + sglang.srt.layers.engram(_staging); not torchvision (stubbed)
SGLANG_DEPS=(triton orjson IPython dill sentencepiece compressed-tensors gguf)

fresh=0
case "${1:-}" in
  --fresh) fresh=1 ;;
  "") ;;
  *) echo "usage: bash engines/install.sh [--fresh]" >&2; exit 2 ;;
esac

# Both engines' Engram modules import, beside this package and torch 2.13.0 (CPU).
imports_both_engines() {
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sys

sys.path.insert(0, ".")
from tests.engines.shims import install_cpu_shims

install_cpu_shims()
import engram_export  # noqa: F401
import sglang.srt.layers.engram  # noqa: F401
import torch
import vllm.models.deepseek_v41.common.engram  # noqa: F401

assert torch.__version__.startswith("2.13.0"), torch.__version__
assert md.version("vllm") == "0.33.0" and md.version("sglang") == "0.5.23"
EOF
}

if [[ $fresh == 0 && -x $VENV/bin/python ]]; then
  if imports_both_engines >/dev/null 2>&1; then
    echo "$VENV already imports vLLM 0.33.0 and SGLang 0.5.23 (bash engines/install.sh --fresh to rebuild)"
    exit 0
  fi
  echo "$VENV does not import both engines: rebuilding it"
fi

start=$(date +%s)
lap=$start
step() {  # step NAME: time since the previous step
  local now
  now=$(date +%s)
  echo "== $1: $((now - lap)) s"
  lap=$now
}

rm -rf "$VENV"
python3 -m venv "$VENV"
printf '*\n' >"$VENV/.gitignore"  # the repo's .gitignore names .venv/ only
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# First, alone: torch==2.13.0 resolves to the CPU build (a plain torch requirement pulls CUDA packages).
"${pip[@]}" torch==2.13.0
step "venv + torch"
"${pip[@]}" -c "$CONSTRAINTS" -e ".[test]"
step "engram-export[test]"
"${pip[@]}" --no-deps "$VLLM" "$SGLANG"
step "$VLLM $SGLANG (--no-deps)"
"${pip[@]}" -c "$CONSTRAINTS" "${VLLM_DEPS[@]}" "${SGLANG_DEPS[@]}"
step "the engines' import-time packages"
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(torchvision|nvidia-)'; then
  echo "a CUDA package came in: engines/constraints.txt misses a pin" >&2
  exit 1
fi
imports_both_engines
step "import check"
echo "$VENV ready in $(($(date +%s) - start)) s"
du -sh "$VENV"
