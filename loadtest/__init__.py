"""pdserve.loadtest: load generation against OpenAI-compatible endpoints (not yet built)."""
