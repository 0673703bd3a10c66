"""What a call of an Engram layer reads, validated before anything runs.

Inputs are checked against the config a model file carries, so a wrong shape, dtype or id is refused
with a one-line ``EngramError``, not a library trace. The runtime, decode sessions and calibration all
read their inputs through these functions.
"""

from __future__ import annotations

import numpy as np

from engram_export.contract.model_info import ModelInfo
from engram_export.core.errors import EngramError
from engram_export.models.hashing import INT32_MIN

__all__ = ["check_ids", "check_lookup_inputs", "check_hidden", "check_out", "check_inputs", "fuse_feeds"]


def _array(name: str, value) -> np.ndarray:
    """``np.asarray(value)``, refusing ragged lists and objects that are not arrays of numbers."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise EngramError(f"{name} is not an array of numbers ({str(exc).splitlines()[0]})") from exc
    if array.dtype.kind not in "biuf":
        raise EngramError(f"{name} is not an array of numbers (dtype {array.dtype})")
    return array


def check_ids(info: ModelInfo, input_ids) -> np.ndarray:
    """Validated ``input_ids``: int64 [B,T], B and T >= 1, ids in [0, vocab) (or, for the demo family,
    negative: they pass through as in the reference)."""
    ids = _array("input_ids", input_ids)
    if ids.dtype.kind not in "iu":
        raise EngramError(f"input_ids must be integer token ids (int64), got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise EngramError(f"input_ids must be [batch, tokens], got shape {list(ids.shape)}")
    if 0 in ids.shape:
        raise EngramError(f"input_ids is empty: shape {list(ids.shape)} (batch and tokens must be >= 1)")
    high, low = int(ids.max()), int(ids.min())
    if high >= info.num_ids:
        raise EngramError(
            f"input_ids: id {high} is out of range [0, {info.num_ids})"
            + ("" if info.takes_mask else " (negative ids pass through as in the reference)")
        )
    if low < (0 if info.takes_mask else INT32_MIN):
        raise EngramError(
            f"input_ids: id {low} is out of range [0, {info.num_ids})"
            if info.takes_mask
            else f"input_ids: id {low} is below int32's range"
        )
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_lookup_inputs(info: ModelInfo, input_ids, token_mask=None) -> dict[str, np.ndarray]:
    """What the lookup reads, validated: ``input_ids`` and, for DeepSeek-V4.1 models, ``token_mask``
    (bool [B,T], False for image tokens; all True when not given)."""
    feeds = {"input_ids": check_ids(info, input_ids)}
    if not info.takes_mask:
        if token_mask is not None:
            raise EngramError("this model takes no token_mask (only DeepSeek-V4.1 models do)")
        return feeds
    shape = feeds["input_ids"].shape
    mask = np.ones(shape, bool) if token_mask is None else _array("token_mask", token_mask)
    if mask.dtype != bool:
        raise EngramError(f"token_mask must be bool (False for image tokens), got dtype {mask.dtype}")
    if mask.shape != shape:
        raise EngramError(f"token_mask must be [batch, tokens] = {list(shape)}, got {list(mask.shape)}")
    feeds["token_mask"] = np.ascontiguousarray(mask)
    return feeds


def check_hidden(info: ModelInfo, feeds: dict, hidden_states) -> np.ndarray:
    """Validated ``hidden_states``: float32 [B,T,G,D] for the ids in ``feeds``."""
    hidden, config = _array("hidden_states", hidden_states), info.config
    if hidden.dtype != np.float32:
        raise EngramError(f"hidden_states must be float32, got dtype {hidden.dtype}")
    expected = [*feeds["input_ids"].shape, config.hc_mult, config.hidden_size]
    if list(hidden.shape) != expected:
        raise EngramError(
            f"hidden_states must be [batch, tokens, hc_mult, hidden_size] = {expected}, got {list(hidden.shape)}"
        )
    return np.ascontiguousarray(hidden)


def check_out(out, hidden: np.ndarray) -> np.ndarray | None:
    """A caller's output array, validated: float32, C-contiguous, writeable, the shape of
    ``hidden_states``, and apart from it (the layer reads its input while writing)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise EngramError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.float32 or list(out.shape) != list(hidden.shape):
        raise EngramError(f"out must be float32 {list(hidden.shape)}, got {out.dtype} {list(out.shape)}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise EngramError("out must be a C-contiguous, writeable array")
    if np.shares_memory(out, hidden):
        raise EngramError("out must not share memory with hidden_states")
    return out


def check_inputs(info: ModelInfo, input_ids, hidden_states, token_mask=None) -> tuple[dict, np.ndarray]:
    """Validated lookup inputs (``check_lookup_inputs``) and hidden states."""
    feeds = check_lookup_inputs(info, input_ids, token_mask)
    return feeds, check_hidden(info, feeds, hidden_states)


def fuse_feeds(feeds: dict) -> dict:
    """What the fuse stage reads of the lookup's inputs: the token mask (V4.1 gates image tokens)."""
    return {"token_mask": feeds["token_mask"]} if "token_mask" in feeds else {}
