"""The ONNX side: tracing a PyTorch Engram layer into ONNX (``export.py``; DeepSeek-V4.1 checkpoints,
table kept as stored, in ``export_v41.py``), reading and writing exported files (``files.py``), and the
custom-domain ops they use, each with its ONNX function and numpy kernel (``op.py``: HashGather and
GatedShortConv; ``op_fp8.py``: the FP8 table's blocked hash-gather)."""
