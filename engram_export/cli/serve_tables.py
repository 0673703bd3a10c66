"""engram-export serve-tables: a folder's tables served by shards on a Ray cluster, for
``EngramRuntime(folder, tables="ray://NAME")``; ``--stop`` ends them."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import FLAGS

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "serve-tables",
        parents=[FLAGS],
        help="serve a folder's tables from shards on a Ray cluster (pip install 'engram-export[ray]')",
    )
    p.add_argument("model", type=Path, nargs="?", help="a folder from export, compile or quantize (either family)")
    p.add_argument("--name", required=True, help="the tables' name on the cluster: the runtime opens ray://NAME")
    p.add_argument("--shards", type=int, default=1, help="shards, cut at hash-head boundaries, balanced by bytes")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each shard (on different nodes if it can)")
    p.add_argument(
        "--table-memory",
        choices=("mmap", "populate", "tiered"),
        default="mmap",
        help="how a shard holds its rows: the file's pages read on demand, read into memory at start, or "
        "(a folder made by calibrate) its hot rows in memory and the rest read from the file",
    )
    p.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else the one running on this machine)")
    p.add_argument("--stop", action="store_true", help="end the shards of --name instead")
    p.add_argument("--repair", action="store_true", help="start again the replicas of --name that are not running")
    p.set_defaults(func=run)


def run(args) -> None:
    from engram_export.core.errors import EngramError
    from engram_export.sharding.cluster import describe, repair_tables, serve_tables, stop_tables

    if args.stop or args.repair:
        if args.model is not None or (args.stop and args.repair):
            raise EngramError("serve-tables --stop or --repair takes --name only, not a folder")
        if args.stop:
            print(f"stopped tables {args.name!r}: {stop_tables(args.name, args.address)} shard replica(s) ended")
        else:
            started = repair_tables(args.name, args.address)
            print(f"tables {args.name!r}: {len(started)} replica(s) started again {' '.join(started)}".rstrip())
        return
    if args.model is None or not args.model.is_dir():
        raise EngramError(f"serve-tables takes a folder with a manifest; got {args.model}")
    print(describe(serve_tables(args.model, args.name, args.shards, args.replicas, args.table_memory, args.address)))
