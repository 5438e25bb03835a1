"""Wire formats both ends agree on, as pure code: no sockets, no asyncio, no clock (sans-I/O)."""
