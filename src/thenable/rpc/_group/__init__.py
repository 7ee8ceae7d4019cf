"""The group of workers: rendezvous, joins and the shutdown barrier (``rendezvous``), torchrun's
store (``store``) and tracing across workers (``tracing``)."""
