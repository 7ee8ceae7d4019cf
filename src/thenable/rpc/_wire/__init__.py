"""The wire format, pure: frames and the handshake (``protocol``, sans-IO: no sockets, threads,
clocks or memory mappings) and what messages carry (``serialize``: pickling with out-of-band
array and tensor buffers, remote errors)."""
