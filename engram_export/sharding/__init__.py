"""Engram tables sharded across the machines of a Ray cluster: ``engram-export serve-tables`` starts the
shards (``cluster``), ``EngramRuntime(folder, tables="ray://NAME")`` looks rows up on them (``client``).
``ray`` is an optional dependency (``pip install "engram-export[ray]"``): only these modules import it,
and only when they run."""
