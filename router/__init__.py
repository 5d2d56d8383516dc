"""pdserve.router: the OpenAI-compatible gateway and prefix-aware routing.

Never imports torch. Modules:

* ``app`` -- the FastAPI app (``create_app``, ``serve``): routes, auth, SSE, errors.
* ``gateway`` -- ``GatewayConfig`` and the core below HTTP: tokenization, routing,
  the Generate calls on decode workers, cancellation.
* ``schemas`` -- the request bodies (OpenAI's, with vLLM's extensions) and each field's
  policy; ``fields`` -- the policy mechanism (honoured / refused / unknown) and the JSON
  bounds; ``prepare`` -- a body -> prompts and sampling parameters (and /tokenize);
  ``responses`` -- response bodies, usage, logprobs; ``errors`` -- the error envelope.
* ``metrics`` -- the gateway's Prometheus series.
* ``policy`` / ``index`` / ``events`` -- routing policies, the global prefix index and
  the KV-event follower that feeds it.

``from pdserve.router import create_app, serve, GatewayConfig`` loads the web stack on
first use only, so ``pdserve.router.policy`` stays importable without FastAPI.
"""

__all__ = ["GatewayConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
