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
from engram_export.measure.depth import DepthRound, DepthSchedule, run_round
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
    """A way to hold the rows: ``open()`` gives a fresh ``EngramRows`` for a round, ``before_round()``
    runs before it opens (evicting the table from the page cache, say), ``candidates`` reads the likeliest
    next tokens' rows ahead, ``warm`` reads every row of the round once before it is timed."""

    name: str
    open: Callable[[], object]
    before_round: Callable[[], None] | None = None
    candidates: NgramCandidates | None = None
    warm: bool = False


def _round(schedule: DepthSchedule, rows, hashing, ids: np.ndarray, mode: RowsMode, counts: Counter) -> DepthRound:
    steps = hashed_steps(hashing, ids)
    batch, length = ids.shape
    if mode.warm:
        for layer, every in steps.items():
            rows[layer].read(every, form=FORM)
    outs = {layer: np.empty((*steps[layer].shape[1:], rows[layer].width(FORM)), np.uint8) for layer in steps}
    prefetched: list = []

    def issue(t: int):
        for pending in prefetched:  # the candidates' reads left of the last step: this step's reads first
            pending.cancel()
        return {layer: rows[layer].start(steps[layer][t], outs[layer], form=FORM) for layer in steps}

    def after_rows(t: int) -> None:
        if t + 1 >= length:
            return
        candidates, candidate_rows = mode.candidates.rows(hashing, ids, t)
        counts["sampled was a candidate"] += int((candidates == ids[:, t + 1 : t + 2]).any(axis=1).sum())
        counts["tokens"] += batch
        prefetched.extend(rows[layer].prefetch(candidate_rows[layer]) for layer in steps)

    before = rows.stats()
    measured = run_round(
        schedule,
        length,
        batch,
        issue,
        lambda handles, layer: handles[layer].wait(),
        after_rows if mode.candidates is not None else None,
    )
    for pending in prefetched:
        pending.wait()
    for layer, stats in rows.stats().items():
        for key, value in stats.items():
            counts[key] += value - before[layer].get(key, 0)
    return measured


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
    Every mode serves the same ids in the same order; a fresh ``EngramRows`` each round."""
    from engram_export.measure.depth import schedule_for

    config = hashing.config
    rows_out: list[list] = []
    for step_s in step_times:
        schedule = schedule_for(config, step_s, backbone_layers)
        for batch in batches:
            first = None
            for mode in modes:
                measured, counts = DepthRound({}), Counter()
                for round_ in range(rounds):
                    ids = windows(stream[round_ * 7919 :], steps, batch)
                    if mode.before_round is not None:
                        mode.before_round()
                    rows = mode.open()
                    measured.merge(_round(schedule, rows, hashing, ids, mode, counts))
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
    from engram_export.measure.depth import schedule_for

    config = hashing.config
    schedule = schedule_for(config, step_s, backbone_layers)
    queue = [prompt[None] for prompt in windows(stream, prompt_tokens, prompts)]
    hashed = [hashed_steps(hashing, prompt) for prompt in queue]  # layer -> [T, 1, heads]
    table = []
    first = None
    for mode, read_ahead in modes:
        if mode.before_round is not None:
            mode.before_round()
        rows = mode.open()
        if mode.warm:
            for prompt in hashed:
                for layer, every in prompt.items():
                    rows[layer].read(every, form=FORM)
        counts: Counter = Counter()
        before = rows.stats()
        ahead: list = []

        def issue(k: int, rows=rows, ahead=ahead):
            for pending in ahead:
                pending.cancel()
            return {layer: rows[layer].start(hashed[k][layer], form=FORM) for layer in config.layer_ids}

        def after_rows(k: int, rows=rows, ahead=ahead) -> None:
            if k + 1 < prompts:
                ahead.extend(rows[layer].prefetch(hashed[k + 1][layer]) for layer in config.layer_ids)

        measured = run_round(
            schedule,
            prompts,
            prompt_tokens,
            issue,
            lambda handles, layer: handles[layer].wait(),
            after_rows if read_ahead else None,
        )
        for pending in ahead:
            pending.wait()
        for layer, stats in rows.stats().items():
            for key, value in stats.items():
                counts[key] += value - before[layer].get(key, 0)
        per_s = measured.tokens / measured.seconds
        first = first or per_s
        waits = [measured.wait_ms(layer) for layer in schedule.engram]
        name = mode.name + (" + queued read-ahead" if read_ahead else "")
        table.append([name, f"{per_s:,.0f}", f"{per_s / first:.3f}", *waits, _served(counts)[0]])
        del rows
    headers = ["rows", "tokens/s", "vs first"]
    headers += [f"layer {layer} wait p50 / p99 ms" for layer in schedule.engram]
    headers += ["hot / cache / candidates / read"]
    return format_table(table, headers)
