"""pdserve.prefill_worker: the prefill server (not yet built)."""
