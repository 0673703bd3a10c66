"""The ground level: what every other part of the package uses and what imports nothing of it.

``errors`` (the exceptions users see), ``progress`` (logging of long work), ``fileio`` (checked
inputs, outputs written whole or not at all, table links and sparse copies), ``integrity`` (sizes and
hashes of the files we write), ``resources`` (memory and disk asked for, refused up front), ``text``
(real text as token ids) and ``checkpoint`` (safetensors shard headers, read without the tables).
"""
