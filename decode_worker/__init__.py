"""pdserve.decode_worker: the decode server (not yet built)."""
