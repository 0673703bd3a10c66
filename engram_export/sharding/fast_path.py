"""The fast data path to the shards: a Ray compiled graph over one checked replica of each shard.

A compiled graph sends a call's requests and takes the answers through channels set up once (shared
memory on one node), not through a Ray task each: several times less than actor calls on one host
(docs/sharding.md). It is only a faster way to the same ``TableShard`` rows: the client builds it from
handles that passed the identity check, and on any failure (a channel error, a replica that died or was
restarted, a timeout) it is torn down and the call goes the actor-call way, with failover and hedging.

Ray tears down compiled graphs still registered when it shuts down with ``kill_actors=True``, which would
end shared detached shards for good: a graph here is taken off that list and torn down by its client
(``close``, at exit too), never killing an actor.
"""

from __future__ import annotations

import atexit
import threading
import weakref

__all__ = ["FastPath", "LANES"]

LANES = 8  # compiled graphs (clients) a shard replica runs at once: its "_ray_system" threads

_open: weakref.WeakSet = weakref.WeakSet()
_at_exit: list = []


class FastPath:
    """A compiled graph whose input is one request per shard (``TableShard.serve``'s bytes, or ``None``
    for a shard with nothing to do) and whose output is each shard's answer."""

    def __init__(self, ray, handles: list):
        from ray.dag import InputNode, MultiOutputNode, compiled_dag_node

        self.ray = ray
        with InputNode() as given:
            dag = MultiOutputNode([handle.serve.bind(given[shard]) for shard, handle in enumerate(handles)])
        self._graph = dag.experimental_compile()
        compiled_dag_node._compiled_dags.pop(self._graph.get_id(), None)  # torn down here, actors kept
        self._closed = False
        _open.add(self)
        try:
            self.read([None] * len(handles), 30.0)  # the channels' first trip: not on a caller's clock
        except BaseException:
            self.close()
            raise
        if not _at_exit:  # registered after Ray's own exit hook: runs before it
            _at_exit.append(atexit.register(_close_all))

    def read(self, requests: list, timeout: float) -> list:
        """Each shard's answer to its request (``None`` where it had none); raises on any failure. One
        call at a time (the caller holds a lock)."""
        return self.ray.get(self._graph.execute(*requests), timeout=timeout)

    def close(self) -> None:
        """Tear the graph down (the shards' loops end; no actor is killed)."""
        if not self._closed:
            self._closed = True
            try:
                self._graph.teardown(kill_actors=False)
            except Exception:  # a replica already gone: nothing left to end
                pass

    def close_later(self) -> None:
        """``close`` on a thread of its own (a teardown may wait on a replica that died)."""
        threading.Thread(target=self.close, name="engram-fast-path-close", daemon=True).start()


def _close_all() -> None:
    for path in list(_open):
        path.close()
