"""Measuring tools, apart from the core: numerics against PyTorch (``verify.py``) and speed, one module
per ``engram-export bench`` mode (``bench.py``: layer; ``bench_lookup.py``; ``decode_bench.py``;
``bench_v41.py``: layer and decode of a DeepSeek-V4.1 config; ``bench_tiered.py`` with its tables in
``tiered_*.py``; ``bench_sharded.py``: ray). What they share lives in ``common.py`` and ``v41_text.py``:
no bench imports another."""
