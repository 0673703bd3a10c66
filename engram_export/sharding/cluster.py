"""Tables served by shards on a Ray cluster: start them (``serve_tables``), end them (``stop_tables``),
find them (``served_layout``).

Each shard replica is a detached named Ray actor (``TableShard``) in the namespace ``engram-export``;
Ray restarts one whose process dies (``max_restarts=-1``). Beside them, one small detached actor under the
tables' own name holds the layout (the shards' pieces, the replicas' names, the fingerprint of each
layer), so that a runtime anywhere on the cluster finds and checks them from the name alone. The cluster
is found as Ray finds it: ``address`` (``--address``), else ``RAY_ADDRESS``, else a cluster running on
this machine; this module never starts one.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from engram_export.core import progress
from engram_export.core.errors import EngramError, EngramUnavailable, one_line
from engram_export.core.integrity import FileChecks
from engram_export.folders.manifest import read_manifest
from engram_export.models.table_rows import hashing_of
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.row_kernel import stored_table
from engram_export.openvino.stages import split_stages
from engram_export.sharding.fast_path import LANES
from engram_export.sharding.layout import ShardPlan, layer_identity, plan_shards
from engram_export.sharding.names import NAMESPACE, cause_of, check_name, replica_name
from engram_export.sharding.shard import SHARD_MEMORY, TableShard

__all__ = ["connect", "serve_tables", "stop_tables", "repair_tables", "served_layout", "describe"]

START_TIMEOUT_S = 600.0  # a populate shard reads its rows before it answers


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise EngramError('tables on Ray need the ray package: pip install "engram-export[ray]"') from exc
    return ray


def connect(address: str | None = None):
    """The ``ray`` module, joined to the cluster at ``address`` (else ``RAY_ADDRESS``, else the one
    running here); a one-line ``EngramUnavailable`` when there is none. A process already joined stays
    where it is."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS") or "auto"
    _probe(where)
    try:
        ray.init(address=where, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ... as Ray's versions choose
        raise EngramUnavailable(f"cannot reach a Ray cluster at {where!r}: {one_line(exc)}") from exc
    return ray


def _probe(where: str) -> None:
    """Refuse at once a ``host:port`` where nothing listens (Ray itself retries for minutes)."""
    host, _, port = where.rpartition(":")
    if where == "auto" or "://" in where or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise EngramUnavailable(f"cannot reach a Ray cluster at {where!r}: {exc.strerror or exc}") from exc


class _Layout:
    """The detached actor that holds a served layout."""

    def __init__(self, layout: dict):
        self.layout = layout

    def get(self) -> dict:
        return self.layout


def _actor(ray, name: str):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:  # no such actor
        return None


def _tables_of(folder: Path):
    """(manifest, layer -> rows of each hash head, layer -> stored bytes a row) of the folder."""
    checks = FileChecks()  # the manifest's, then each layer's files (by size: the manifest checked them)
    manifest = read_manifest(folder, checks)
    config = manifest.config
    hashing = hashing_of(config)
    heads, row_bytes = {}, {}
    for layer, name in manifest.layers.items():
        model, _ = read_openvino(folder / name, checks)
        table = stored_table(split_stages(model)[0])
        if table is None:
            raise EngramError(f"{folder / name}: its table is not one the row kernel reads, so it cannot be sharded")
        heads[layer] = hashing.primes(layer)
        if sum(heads[layer]) != table.table_rows:
            raise EngramError(
                f"{folder / name}: the table has {table.table_rows} rows, its hash heads {sum(heads[layer])}"
            )
        row_bytes[layer] = table.layout.bytes_per_row
    return manifest, heads, row_bytes


def _check_memory(ray, plans: list[ShardPlan], replicas: int) -> int:
    """Refuse a layout the cluster's memory (Ray's ``memory`` resource) cannot hold, with the numbers;
    the number of live nodes."""
    nodes = [node.get("Resources", {}).get("memory", 0) for node in ray.nodes() if node.get("Alive")]
    needed, largest = sum(plan.nbytes for plan in plans) * replicas, max(plan.nbytes for plan in plans)
    gib = 2**30
    if needed > sum(nodes):
        raise EngramError(
            f"{len(plans)} shards x {replicas} replicas need {needed / gib:.2f} GiB of memory; the cluster's "
            f"{len(nodes)} node(s) have {sum(nodes) / gib:.2f} GiB for Ray"
        )
    if largest > max(nodes, default=0):
        raise EngramError(
            f"the largest shard needs {largest / gib:.2f} GiB of memory; the largest node has "
            f"{max(nodes, default=0) / gib:.2f} GiB for Ray: use more shards"
        )
    return len(nodes)


def serve_tables(
    folder: str | Path,
    name: str,
    shards: int = 1,
    replicas: int = 1,
    table_memory: str = "mmap",
    address: str | None = None,
) -> dict:
    """Start the shards of ``folder``'s tables on the cluster under ``name`` and return the layout once
    every replica answers (``describe`` prints it). A failed start removes every actor it made."""
    folder = Path(folder).resolve()
    check_name(name)
    for what, value in (("shards", shards), ("replicas", replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EngramError(f"{what} must be a positive integer, got {value!r}")
    if table_memory not in SHARD_MEMORY:
        raise EngramError(f"a shard's table_memory must be one of {', '.join(SHARD_MEMORY)}, got {table_memory!r}")
    manifest, heads, row_bytes = _tables_of(folder)
    if table_memory == "tiered" and manifest.calibration is None:
        raise EngramError(f"--table-memory tiered serves a folder made by engram-export calibrate; {folder} is not one")
    plans = plan_shards(heads, row_bytes, shards)
    identities = {str(layer): layer_identity(folder, manifest, layer) for layer in manifest.layers}
    ray = connect(address)
    if _actor(ray, name) is not None:
        raise EngramError(
            f"tables named {name!r} are already served on this cluster: stop them first "
            f"(engram-export serve-tables --stop --name {name})"
        )
    nodes = _check_memory(ray, plans, replicas)
    layout = {
        "name": name,
        "folder": str(folder),
        "identities": identities,
        "shards": [plan.to_dict() for plan in plans],
        "replicas": replicas,
        "table_memory": table_memory,
        # replicas of a shard on different nodes, where there are enough nodes (a placement group each)
        "spread": 1 < replicas <= nodes,
    }
    made = [ray.remote(_Layout).options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0).remote(layout)]
    try:
        pending = {}
        for plan in plans:
            if layout["spread"]:
                made.append(_placement_group(ray, layout, plan))
            for replica in range(replicas):
                actor = _spawn(ray, layout, plan, replica)
                made.append(actor)
                pending[(plan.index, replica)] = actor.identity.remote()
        started = _wait_started(ray, pending)
    except BaseException:
        _remove(ray, made)
        raise
    layout["nodes"] = {f"{shard}.{replica}": node for (shard, replica), node in started.items()}
    return layout


def _group_name(name: str, shard: int) -> str:
    return f"{name}.shard{shard}"


def _placement_group(ray, layout: dict, plan: ShardPlan):
    """The detached placement group that puts the replicas of ``plan`` on different nodes, ready."""
    from ray.util.placement_group import placement_group

    group = placement_group(
        [{"memory": max(1, plan.nbytes)}] * layout["replicas"],
        strategy="STRICT_SPREAD",
        name=_group_name(layout["name"], plan.index),
        lifetime="detached",
    )
    try:
        ray.get(group.ready(), timeout=60)
    except Exception as exc:
        ray.util.remove_placement_group(group)
        raise EngramUnavailable(
            f"the {layout['replicas']} replicas of shard {plan.index} ({plan.nbytes / 2**30:.2f} GiB each) cannot "
            f"be placed on different nodes: {cause_of(exc)}"
        ) from exc
    return group


def _remove(ray, made: list) -> None:
    """End the actors and remove the placement groups of ``made``."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for thing in made:
        if isinstance(thing, PlacementGroup):
            remove_placement_group(thing)
        else:
            ray.kill(thing, no_restart=True)


def _spawn(ray, layout: dict, plan: ShardPlan, replica: int):
    """A replica of the shard ``plan`` of ``layout``, as a detached named actor: in its bundle of the
    shard's placement group where the layout spreads replicas, else where Ray spreads it."""
    strategy: object = "SPREAD"
    if layout.get("spread"):
        from ray.util import get_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            get_placement_group(_group_name(layout["name"], plan.index)), placement_group_bundle_index=replica
        )
    return (
        ray.remote(concurrency_groups={"_ray_system": LANES})(TableShard)  # the clients' compiled graphs
        .options(
            name=replica_name(layout["name"], plan.index, replica),
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=-1,  # Ray starts a replica again when its process dies
            max_task_retries=0,  # the client fails over to another replica, or retries itself
            max_concurrency=8,
            num_cpus=0,
            memory=max(1, plan.nbytes),
            scheduling_strategy=strategy,
        )
        .remote(layout["folder"], layout["name"], plan.to_dict(), layout["identities"], layout["table_memory"])
    )


def repair_tables(name: str, address: str | None = None) -> list[str]:
    """Start again every replica of the tables ``name`` that is not running (one Ray could not restart:
    killed for good, or its node gone); the names of those started, once they answer."""
    layout = served_layout(name, address)
    ray = connect(address)
    pending = {}
    for shard in layout["shards"]:
        plan = ShardPlan.from_dict(shard)
        for replica in range(layout["replicas"]):
            if _actor(ray, replica_name(name, plan.index, replica)) is None:
                pending[(plan.index, replica)] = _spawn(ray, layout, plan, replica).identity.remote()
    _wait_started(ray, pending)
    return [replica_name(name, shard, replica) for shard, replica in pending]


def _wait_started(ray, pending: dict) -> dict:
    """(shard, replica) -> node id, once each replica answered; a one-line error naming one that failed:
    ``EngramError`` where the shard refused its folder (an error in its start), ``EngramUnavailable``
    where the cluster did not start it (no answer in time, its process or node gone)."""
    nodes, deadline = {}, time.monotonic() + START_TIMEOUT_S
    with progress.steps("starting the table shards", len(pending), "replicas") as counter:
        for (shard, replica), answer in pending.items():
            try:
                nodes[(shard, replica)] = ray.get(answer, timeout=max(0.0, deadline - time.monotonic()))["node"]
            except Exception as exc:
                refused = getattr(exc, "actor_init_failed", False)
                error = EngramError if refused else EngramUnavailable
                raise error(f"shard {shard} replica {replica} did not start: {cause_of(exc)}") from exc
            counter.advance()
    return nodes


def served_layout(name: str, address: str | None = None, timeout: float = 30.0) -> dict:
    """The layout of the tables served under ``name``; a one-line error when there are none."""
    ray = connect(address)
    holder = _actor(ray, check_name(name))
    if holder is None:
        raise EngramError(f"no tables named {name!r} are served on this Ray cluster (engram-export serve-tables)")
    try:
        return ray.get(holder.get.remote(), timeout=timeout)
    except Exception as exc:
        raise EngramUnavailable(f"the layout of tables {name!r} did not answer: {cause_of(exc)}") from exc


def stop_tables(name: str, address: str | None = None) -> int:
    """End every replica of the tables ``name`` and their layout; the number of actors ended."""
    layout = served_layout(name, address)
    ray = connect(address)
    ended = 0
    for shard in layout["shards"]:
        for replica in range(layout["replicas"]):
            actor = _actor(ray, replica_name(name, shard["index"], replica))
            if actor is not None:
                ray.kill(actor, no_restart=True)
                ended += 1
    if layout.get("spread"):
        from ray.util import get_placement_group, remove_placement_group

        for shard in layout["shards"]:
            try:
                remove_placement_group(get_placement_group(_group_name(name, shard["index"])))
            except ValueError:  # removed already
                pass
    holder = _actor(ray, name)
    if holder is not None:
        ray.kill(holder, no_restart=True)
    return ended


def describe(layout: dict) -> str:
    """The layout as lines for a terminal: each shard's pieces, bytes and where its replicas run."""
    nodes = layout.get("nodes", {})
    lines = [
        f"tables {layout['name']!r} of {layout['folder']}: {len(layout['shards'])} shard(s) x "
        f"{layout['replicas']} replica(s), table_memory {layout['table_memory']}",
        f"{'shard':>5}  {'MiB':>10}  {'pieces (layer: rows)':<44} replicas on nodes",
    ]
    for shard in layout["shards"]:
        pieces = ", ".join(f"{p['layer']}: {p['start']:,}..{p['stop'] - 1:,}" for p in shard["pieces"])
        where = [nodes.get(f"{shard['index']}.{replica}", "?")[:8] for replica in range(layout["replicas"])]
        lines.append(f"{shard['index']:>5}  {shard['nbytes'] / 2**20:>10,.1f}  {pieces:<44} {' '.join(where)}")
    all_nodes = set(nodes.values())
    if layout.get("spread"):
        lines.append("the replicas of each shard are on different nodes (a placement group each, STRICT_SPREAD)")
    elif layout["replicas"] > 1 and len(all_nodes) == 1:
        lines.append("one node: the replicas of each shard share it (a node's failure takes every replica)")
    elif layout["replicas"] > 1:
        shared = [
            s["index"]
            for s in layout["shards"]
            if len({nodes.get(f"{s['index']}.{r}") for r in range(layout["replicas"])}) < layout["replicas"]
        ]
        if shared:
            lines.append(f"shards {shared}: some replicas share a node (too few nodes with the memory)")
    return "\n".join(lines)
