"""A decode step of a GPU backbone with each Engram layer at its depth: the schedule every bench that
models a backbone runs.

A step of ``step_s`` seconds is ``layers`` backbone layers of equal time, run on the GPU (a GPU leaves
the CPU free, so the stand-in sleeps). The step's ids are known when it begins: every Engram layer's
rows are issued then (vLLM issues them before the decoder layers run). Engram layer L is needed when the
GPU reaches backbone layer L, ``L / layers`` of the step later (DeepSeek-V4.1's layer 1 of 40: 0.375 ms
of a 15 ms step); if its rows (or, where the CPU runs the whole module, its fuse) are not ready then,
the GPU waits, and every later layer with it. That wait is the layer's exposed wait.

Time is kept on the GPU's timeline (``cursor``: when it reaches the next layer): a wait is counted
from there to when the rows were ready, so the stand-in's sleeping late never counts as a wait or hides
one, and nothing spins on the cores the reads need. Tokens/s is of that timeline: steps x step time plus
the waits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engram_export.core.errors import EngramError

__all__ = [
    "DepthSchedule",
    "backbone_layers",
    "schedule_for",
    "DepthRound",
    "run_round",
    "sleep_until",
    "STEP_TIMES_S",
    "BATCHES",
]

STEP_TIMES_S = (0.005, 0.015, 0.050)  # decode steps of a GPU backbone: small, V4.1-Flash-like, large
BATCHES = (1, 8, 64)


@dataclasses.dataclass(frozen=True)
class DepthSchedule:
    """``layers`` backbone layers of ``step_s / layers`` seconds each; ``engram`` the backbone layers that
    carry an Engram, in order."""

    layers: int
    step_s: float
    engram: tuple[int, ...]

    @property
    def layer_s(self) -> float:
        return self.step_s / self.layers

    def budget_s(self, layer: int) -> float:
        """How long after the step begins the GPU reaches ``layer``: its rows' time."""
        return layer * self.layer_s


def backbone_layers(config, given: int | None = None) -> int:
    """``given``, else the config's ``num_hidden_layers``; refused where neither says."""
    layers = given or config.num_hidden_layers
    if layers is None:
        raise EngramError("the config does not say how many layers the backbone has: give --backbone-layers")
    return layers


def schedule_for(config, step_s: float, given_layers: int | None = None) -> DepthSchedule:
    """The schedule of ``config``'s Engram layers in a backbone of ``given_layers`` layers (default: the
    config's ``num_hidden_layers``); refused where neither says, or an Engram layer is past the end."""
    layers = backbone_layers(config, given_layers)
    engram = tuple(sorted(config.layer_ids))
    if not isinstance(layers, int) or layers <= engram[-1]:
        raise EngramError(f"a backbone of {layers!r} layers cannot carry Engram layers {list(engram)}")
    if not step_s > 0:
        raise EngramError(f"a step must take some time, got {step_s!r} s")
    return DepthSchedule(layers, step_s, engram)


def sleep_until(deadline: float) -> None:
    """Sleep until ``deadline`` (``time.perf_counter``), or not at all if it has passed."""
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


@dataclasses.dataclass
class DepthRound:
    """What a round of steps measured: each Engram layer's exposed wait per step (seconds), and the
    round's time on the GPU's timeline and its tokens."""

    waits: dict[int, list[float]]
    seconds: float = 0.0
    tokens: int = 0

    def percentile_us(self, layer: int, q: float) -> float:
        return float(np.percentile(self.waits[layer], q) * 1e6)

    def wait_ms(self, layer: int) -> str:
        """``layer``'s exposed wait, "p50 / p99" in ms."""
        return f"{self.percentile_us(layer, 50) / 1e3:.2f} / {self.percentile_us(layer, 99) / 1e3:.2f}"

    def merge(self, other: DepthRound) -> None:
        for layer, waits in other.waits.items():
            self.waits.setdefault(layer, []).extend(waits)
        self.seconds += other.seconds
        self.tokens += other.tokens


def run_round(
    schedule: DepthSchedule,
    steps: int,
    batch: int,
    issue: Callable[[int], Any],
    ready: Callable[[Any, int], float | None],
    after_rows: Callable[[int], None] | None = None,
) -> DepthRound:
    """``steps`` decode steps of ``batch`` tokens on ``schedule``: at step t's start ``issue(t)`` (whatever
    it returns is the step's handle); when the GPU reaches Engram layer L, ``ready(handle, L)`` blocks until
    L's rows are ready (or L is fused) and returns when they were (``time.perf_counter``), or None: when it
    returned; once the last Engram layer is served, ``after_rows(t)`` (work for later steps, such as
    candidates' reads)."""
    measured = DepthRound({layer: [] for layer in schedule.engram})
    for t in range(steps):
        cursor = time.perf_counter()  # the ids are known: the GPU starts layer 0
        handle = issue(t)
        done = 0
        for layer in schedule.engram:
            cursor += (layer - done) * schedule.layer_s
            done = layer
            sleep_until(cursor)
            called = time.perf_counter()
            at = ready(handle, layer)
            waited = max(0.0, at - cursor) if at is not None else time.perf_counter() - max(cursor, called)
            measured.waits[layer].append(waited)
            cursor += waited  # the GPU waited for the rows, every later layer with it
        if after_rows is not None:
            after_rows(t)
        sleep_until(cursor + (schedule.layers - done) * schedule.layer_s)
        measured.seconds += schedule.step_s + sum(measured.waits[layer][-1] for layer in schedule.engram)
    measured.tokens = steps * batch
    return measured
