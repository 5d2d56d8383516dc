"""pdserve.router: the OpenAI-compatible gateway and prefix-aware routing (not yet built)."""
