"""One RPC worker: the agent (calls out, requests in, peers, shutdown; ``agent``), its calls'
deadlines (``deadlines``), the worker a thread serves or sends for (``context``), the one
extension point for the layer above (``extensions``) and how user errors are logged on the
callee (``callee_log``)."""
