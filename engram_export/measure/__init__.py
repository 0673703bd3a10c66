"""Measuring tools, apart from the core: numerics against PyTorch (``verify.py``) and speed
(``bench.py``; the lookup alone in ``bench_lookup.py``, DeepSeek-V4.1 in ``bench_v41.py``, decode in
``decode_bench.py``)."""
