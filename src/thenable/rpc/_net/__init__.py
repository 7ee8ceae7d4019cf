"""Moving frames between workers: sockets and authenticated connects (``sockets``), one
connection to a peer (``transport``), a link while a first connect is under way (``dialing``),
same-host shared memory for large payloads (``shm``) and recycled memory to receive them into
(``memory``)."""
