"""engram-export extension: the path of the OpenVINO extension library (built if needed)."""

from __future__ import annotations

from engram_export.cli.common import FLAGS

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "extension", parents=[FLAGS], help="print the path of the OpenVINO extension library (built if needed)"
    )
    p.set_defaults(func=run)


def run(args) -> None:
    from engram_export.openvino.extension import library_path

    print(library_path())
