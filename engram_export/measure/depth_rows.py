"""Rows for a GPU engine at each Engram layer's depth: what ``bench tiered`` and ``bench ray`` measure
through the row API (``EngramRows``), as vLLM's and SGLang's plug-ins use it.

The engine hashes on the GPU; the host gives the rows of the ids it computed. Here the hash ids of every
step are computed before the round (``hashed_steps``: what the GPU would compute), each step's reads are
issued with ``start`` when the step begins and waited for at each Engram layer's depth
(``depth.run_round``). Rows come back packed (vLLM's 264 bytes a V4.1 row). Optional levers, each
measured against the same schedule without it:

- candidates (``NgramCandidates``): once the last Engram layer of step t is served, the rows of the k
  likeliest next tokens of every sequence (an n-gram model of the calibration text; a draft model's tokens
  or the last logits' top-k in production) are read into the cache with ``prefetch``, so that if the
  token sampled is one of them its rows need no read at step t+1;
- queued prefill: while a prompt is prefilled, the rows of the next prompt waiting in the queue (its ids
  are known) are read into the cache with ``prefetch``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from engram_export.core.text import windows
from engram_export.measure.common import format_table
from engram_export.measure.depth import DepthRound, DepthSchedule, run_round, schedule_for
from engram_export.models.deepseek_v41_config import V41Hashing

__all__ = ["hashed_steps", "NgramCandidates", "RowsMode", "rows_depth_table", "prefill_depth_table"]

FORM = "packed"


def hashed_steps(hashing: V41Hashing, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Layer -> the table rows of every step of ``ids`` [B, S]: [S, B, heads], each step contiguous."""
    mask = np.ones(ids.shape, bool)
    return {
        layer: np.ascontiguousarray(hashing.rows(ids, mask, layer).transpose(1, 0, 2))
        for layer in hashing.config.layer_ids
    }


class NgramCandidates:
    """The ``k`` likeliest next tokens after a context, by a trigram model of a token stream backed off to
    bigrams and then to the commonest tokens."""

    def __init__(self, stream: np.ndarray, k: int):
        self.k = k
        tokens = stream.tolist()
        after2: dict[tuple[int, int], Counter] = defaultdict(Counter)
        after1: dict[int, Counter] = defaultdict(Counter)
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
            after2[(a, b)][c] += 1
            after1[b][c] += 1
        self._after2 = {key: [t for t, _ in counts.most_common(k)] for key, counts in after2.items()}
        self._after1 = {key: [t for t, _ in counts.most_common(k)] for key, counts in after1.items()}
        self._common = [t for t, _ in Counter(tokens).most_common(k)]

    def next_tokens(self, context: np.ndarray) -> np.ndarray:
        """[B, k] candidates after each row of ``context`` [B, >= 2] (ids; fewer known: backed off)."""
        out = np.empty((len(context), self.k), np.int64)
        for row, tokens in enumerate(context.tolist()):
            chosen = list(self._after2.get(tuple(tokens[-2:]), ()))
            for more in (self._after1.get(tokens[-1], ()), self._common):
                chosen += [t for t in more if t not in chosen]
            out[row] = chosen[: self.k]
        return out

    def rows(self, hashing: V41Hashing, ids: np.ndarray, t: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The candidates after step ``t`` of ``ids`` [B, S] ([B, k]) and their table rows, layer ->
        [B * k, heads]: the hash of each candidate after the step's last tokens, as the GPU would hash it."""
        look_back = hashing.config.max_ngram_size - 1
        context = ids[:, max(0, t + 1 - look_back) : t + 1]
        candidates = self.next_tokens(ids[:, max(0, t - 1) : t + 1])
        windows_ = np.concatenate([np.repeat(context, self.k, axis=0), candidates.reshape(-1, 1)], axis=1)
        mask = np.ones(windows_.shape, bool)
        # a window that starts at the sequence's start is hashed as the sequence's own tokens were
        return candidates, {
            layer: np.ascontiguousarray(hashing.rows(windows_, mask, layer)[:, -1])
            for layer in hashing.config.layer_ids
        }


@dataclasses.dataclass
class RowsMode:
    """A way to hold the rows: ``open()`` gives the ``EngramRows`` of a round (a fresh one, or one kept
    for every round where nothing of a round stays in it), ``before_round()``
    runs before it opens (evicting the table from the page cache, say), ``candidates`` reads the likeliest
    next tokens' rows ahead, ``warm`` reads every row of the round once before it is timed."""

    name: str
    open: Callable[[], object]
    before_round: Callable[[], None] | None = None
    candidates: NgramCandidates | None = None
    warm: bool = False


def _round(schedule: DepthSchedule, rows, steps: dict, tokens: int, warm: bool, ahead, counts: Counter) -> DepthRound:
    """The steps of ``steps`` (layer -> [steps, ...ids of a step]) through ``rows`` on ``schedule``: each
    step's reads started when it begins, waited for at each layer's depth; ``ahead(t)`` (layer -> ids, or
    None) read ahead once step t's last Engram layer is served, what is left of it dropped when the next
    step begins; ``warm``: every row read once first. Adds the tables' counters to ``counts``."""
    if warm:
        for layer, every in steps.items():
            rows[layer].read(every, form=FORM)
    outs = {layer: np.empty((*ids.shape[1:], rows[layer].width(FORM)), np.uint8) for layer, ids in steps.items()}
    read_ahead: list = []

    def issue(t: int):
        for pending in read_ahead:
            pending.cancel()
        return {layer: rows[layer].start(ids[t], outs[layer], form=FORM) for layer, ids in steps.items()}

    def after_rows(t: int) -> None:
        wanted = ahead(t)
        if wanted is not None:
            read_ahead.extend(rows[layer].prefetch(ids) for layer, ids in wanted.items())

    before = rows.stats()
    length = len(next(iter(steps.values())))
    measured = run_round(schedule, length, tokens, issue, _ready, ahead and after_rows)
    for pending in read_ahead:
        pending.wait()
    for layer, stats in rows.stats().items():
        for key, value in stats.items():
            counts[key] += value - before[layer].get(key, 0)
    return measured


def _ready(handles: dict, layer: int) -> float:
    handles[layer].wait()
    return handles[layer].finished_at


def _candidates(mode: RowsMode, hashing: V41Hashing, ids: np.ndarray, counts: Counter):
    """``_round``'s ``ahead`` of decode: after step t, the rows of the candidates for step t + 1."""
    model = mode.candidates
    if model is None:
        return None

    def ahead(t: int):
        if t + 1 >= ids.shape[1]:
            return None
        candidates, candidate_rows = model.rows(hashing, ids, t)
        counts["sampled was a candidate"] += int((candidates == ids[:, t + 1 : t + 2]).any(axis=1).sum())
        counts["tokens"] += ids.shape[0]
        return candidate_rows

    return ahead


def rows_depth_table(
    hashing: V41Hashing,
    modes: list[RowsMode],
    stream: np.ndarray,
    backbone_layers: int,
    step_times: tuple[float, ...],
    batches: tuple[int, ...],
    steps: int,
    rounds: int,
) -> str:
    """Decode at depth through each mode, for each step time and batch size, on windows of ``stream``:
    tokens/s against the first mode, and each Engram layer's exposed wait (p50, p99) against its budget.
    Every mode serves the same ids in the same order, from the ``EngramRows`` its ``open`` gives each round."""
    config = hashing.config
    rows_out: list[list] = []
    for step_s in step_times:
        schedule = schedule_for(config, step_s, backbone_layers)
        for batch in batches:
            first = None
            for mode in modes:
                measured, counts = DepthRound({}), Counter[str]()
                for round_ in range(rounds):
                    ids = windows(stream[round_ * 7919 :], steps, batch)
                    if mode.before_round is not None:
                        mode.before_round()
                    rows = mode.open()
                    ahead = _candidates(mode, hashing, ids, counts)
                    measured.merge(_round(schedule, rows, hashed_steps(hashing, ids), batch, mode.warm, ahead, counts))
                    del rows
                per_s = measured.tokens / measured.seconds
                first = first or per_s
                waits = [
                    f"{schedule.budget_s(layer) * 1e6:,.0f} / {measured.percentile_us(layer, 50):,.0f} / "
                    f"{measured.percentile_us(layer, 99):,.0f}"
                    for layer in schedule.engram
                ]
                rows_out.append(
                    [f"{step_s * 1e3:g}", batch, mode.name, f"{per_s:,.0f}", f"{per_s / first:.3f}", *waits]
                    + _served(counts)
                )
    headers = ["step ms", "B", "rows", "tokens/s", "vs first"]
    headers += [f"layer {layer}: budget / wait p50 / p99 us" for layer in sorted(config.layer_ids)]
    headers += ["hot / cache / candidates / read", "candidate hit", "candidate rows read"]
    return format_table(rows_out, headers)


def _served(counts: Counter) -> list[str]:
    """How the lookups were served (tiered tables' counters; '-' for others), and candidates' hit rate."""
    lookups = counts.get("lookups", 0)
    if not lookups:
        return ["-", "-", "-"]
    shares = [counts.get(key, 0) / lookups for key in ("hot_hits", "cache_hits", "candidate_hits", "read_lookups")]
    hit = "-"
    if counts.get("tokens"):
        hit = f"{counts['sampled was a candidate'] / counts['tokens']:.0%}"
    return [
        " / ".join(f"{share:.0%}" for share in shares),
        hit,
        f"{counts.get('warm_rows_read', 0):,}" if hit != "-" else "-",
    ]


def prefill_depth_table(
    hashing: V41Hashing,
    modes: list[tuple[RowsMode, bool]],
    stream: np.ndarray,
    backbone_layers: int,
    step_s: float,
    prompt_tokens: int,
    prompts: int,
) -> str:
    """Prompts of ``prompt_tokens`` served one after another, each one step of ``step_s`` at depth; a mode
    with read-ahead (its bool) reads the next queued prompt's rows into the cache while one is served."""
    config = hashing.config
    schedule = schedule_for(config, step_s, backbone_layers)
    prompts_ids = windows(stream, prompt_tokens, prompts)[:, :, None]  # [prompts, T, 1]: one sequence each
    steps = {layer: np.stack([hashed_steps(hashing, p.T)[layer] for p in prompts_ids]) for layer in config.layer_ids}
    table = []
    first = None
    for mode, read_ahead in modes:
        if mode.before_round is not None:
            mode.before_round()
        rows, counts = mode.open(), Counter[str]()

        def queued(k: int) -> dict | None:
            return {layer: ids[k + 1] for layer, ids in steps.items()} if k + 1 < len(prompts_ids) else None

        measured = _round(schedule, rows, steps, prompt_tokens, mode.warm, queued if read_ahead else None, counts)
        del rows
        per_s = measured.tokens / measured.seconds
        first = first or per_s
        waits = [measured.wait_ms(layer) for layer in schedule.engram]
        name = mode.name + (" + queued read-ahead" if read_ahead else "")
        table.append([name, f"{per_s:,.0f}", f"{per_s / first:.3f}", *waits, _served(counts)[0]])
    headers = ["rows", "tokens/s", "vs first"]
    headers += [f"layer {layer} wait p50 / p99 ms" for layer in schedule.engram]
    headers += ["hot / cache / candidates / read"]
    return format_table(table, headers)
