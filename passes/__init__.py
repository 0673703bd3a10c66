"""ONNX graph passes for the exported Engram graph (installed as ``engram_export.passes``)."""
