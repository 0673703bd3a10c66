"""Plug-ins that let vLLM and SGLang serve their Engram rows from engram-export's row API
(``runtime/rows.py``): the tiered RAM+SSD tables or Ray shards as the engines' host table
(``docs/engines.md``). Each is an entry point the engine's own plug-in loader finds, inert unless
``ENGRAM_EXPORT_ROWS`` is set (``settings.py``); neither imports its engine until it is loaded there."""
