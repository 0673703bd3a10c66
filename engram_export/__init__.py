"""engram-export: a trained Engram layer to ONNX, OpenVINO and a CPU runtime beside the backbone."""

__all__ = ["EngramRuntime", "EngramError"]

from engram_export.errors import EngramError


def __getattr__(name):
    # The runtime pulls in OpenVINO and ONNX Runtime; import it only when asked for.
    if name == "EngramRuntime":
        from engram_export.runtime import EngramRuntime

        return EngramRuntime
    raise AttributeError(name)
