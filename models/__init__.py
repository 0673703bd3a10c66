"""The PyTorch Engram layer, its configs and the hash (installed as ``engram_export.models``)."""
