"""Timeline tracing: what ``thenable.trace`` and ``THENABLE_TRACE`` record, and how.

``recorder`` keeps per-thread ring buffers of events; ``trace_hooks`` makes Futures and fork
record spans; ``trace`` is ``thenable.trace`` and the environment-started trace; ``trace_file``
writes, reads and merges the parts (one per process) into a Chrome/Perfetto trace;
``trace_plot`` draws a merged trace.  Tracing across workers lives with RPC
(``thenable.rpc._group.tracing``).
"""
