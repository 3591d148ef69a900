"""The vLLM engine: every TP rank of a vLLM engine is a Ray rank actor (``runtime``), and
tp-reload's reload engine drives vLLM's own modules through ``reloadable``. ``platform``
says what vLLM can run here without importing it."""
