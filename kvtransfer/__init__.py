"""pdserve.kvtransfer: moving KV blocks between workers (not yet built)."""
