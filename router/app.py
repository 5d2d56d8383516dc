"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), ``GET /v1/models`` and ``/v1/models/{id}``,
``POST /tokenize`` and ``/detokenize`` (vLLM's), ``GET /health`` (liveness),
``GET /ready`` (at least one prefill-capable and one decode-capable worker registered),
``GET /metrics`` (Prometheus), ``GET /openapi.json`` and ``/docs``. The API key, when
set, guards every route but ``/health``, ``/ready`` and ``/metrics`` (the documents too:
they describe what this server accepts, which is nobody else's business; fetch them
with the key, e.g. ``curl -H "Authorization: Bearer $KEY" .../openapi.json``).

Order of checks for a generation request, cheapest first: API key (401), the body
(``limits.py``: 413 from Content-Length and from the bytes actually read, 408 when it
is not here within ``body_timeout_s``, 503 when the bodies being read hold too many
bytes), JSON and types (400; nesting deeper than 64 levels too), then the in-flight
limit (503 + Retry-After; taken only now, so a slow sender holds no slot), model (404),
field policies (400: a field this server does not honour, at a value other than its
neutral one, or an unknown field; ``fields.py``), values and lengths (400), routing
(503 when no worker); ``prepare.py`` does the middle part. Routes read the raw body (for
the size limit and those checks), so the OpenAPI document gets the request models'
schemas through ``openapi_extra``. Every error is OpenAI's envelope. Streaming requests answer
their headers once the first token (or an error) arrives, so a request that cannot
start gets a real status code; a failure after that ends the stream with
``data: {"error": ...}`` and ``data: [DONE]``. A client that goes away, streaming or
not, cancels its Generate calls, which frees its KV blocks on every worker; so does one
that stops reading a stream for ``send_timeout_s`` (the stream is ended). A stream
writes whatever arrived since its last write at once: one chunk per choice, the
choice's deltas merged (``generation.coalesce``), all in one body write.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import prepare
from .errors import APIError, invalid
from .fields import openapi_schemas
from .gateway import Gateway, GatewayConfig
from .generation import Generation, coalesce
from .limits import ClientGone, SendTimeout, read_body, timed_send, uvicorn_settings
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .responses import ResponseBuilder
from .schemas import REQUEST_MODELS

log = logging.getLogger("pdserve.gateway")

__all__ = ["GatewayConfig", "create_app", "serve"]


_INLINE_BODY_BYTES = 64 << 10
"""Bodies above this are validated and tokenized on a worker thread, off the event loop."""


def create_app(config: GatewayConfig, *, router: Any = None) -> FastAPI:
    """The gateway app; its lifespan connects to the store and follows the workers.

    ``router`` replaces the ``pdserve.router.policy.Router`` built from ``config``.
    """
    gateway = Gateway(config, router=router)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="pdserve gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    _install_error_handlers(app)

    async def authenticate(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            gateway.metrics.requests.labels(_endpoint(request), "unauthorized").inc()
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @v1.post("/completions", openapi_extra=_request_body("CompletionRequest"))
    async def completions(request: Request) -> Response:
        return await _generate(gateway, request, chat=False)

    @v1.post("/chat/completions", openapi_extra=_request_body("ChatCompletionRequest"))
    async def chat_completions(request: Request) -> Response:
        return await _generate(gateway, request, chat=True)

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
                "max_model_len": gateway.context_len}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        prepare.check_model(gateway, model_id)
        return model_card()

    app.include_router(v1)

    @app.post("/tokenize", dependencies=[Depends(authenticate)],
              openapi_extra=_request_body("TokenizeCompletionRequest", "TokenizeChatRequest"))
    async def tokenize(request: Request) -> Response:
        return await _answer(gateway, request, prepare.tokenize)

    @app.post("/detokenize", dependencies=[Depends(authenticate)], openapi_extra=_request_body("DetokenizeRequest"))
    async def detokenize(request: Request) -> Response:
        return await _answer(gateway, request, prepare.detokenize)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authenticate)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authenticate)])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        state = await gateway.ready()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/metrics/targets", dependencies=[Depends(authenticate)])
    async def metrics_targets() -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery (``http_sd_configs``): every registered
        worker's metrics endpoint, labelled with its id and role. Guarded by the API key:
        it names internal addresses."""
        return gateway.metrics_targets()

    app.openapi = lambda: _openapi(app)
    return app


def _request_body(*models: str) -> dict[str, Any]:
    """``openapi_extra`` naming a route's request model(s): the route reads the raw body."""
    refs = [{"$ref": f"#/components/schemas/{m}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible API (with vLLM's extensions) of a pdserve cluster.")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas(REQUEST_MODELS))
        app.openapi_schema = doc
    return app.openapi_schema


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, invalid(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(e.status_code, str(e.detail), type=kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return await api_error(request, APIError(500, "internal server error", type="server_error",
                                                 code="internal_error"))


def _endpoint(request: Request) -> str:
    """The metric label of a route: its path template, never the client's path."""
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    return path.split("/{")[0].removeprefix("/v1/").strip("/").replace("/", "_")


def _outcome(e: APIError) -> str:
    if e.status == 401:
        return "unauthorized"
    if e.code == "request_timeout":
        return "body_timeout"
    if e.status < 500:
        return "invalid"
    return {"overloaded": "overloaded", "no_workers": "no_workers", "timeout": "timeout"}.get(e.code or "", "error")


# -- one generation request ----------------------------------------------------------------


async def _generate(gateway: Gateway, request: Request, *, chat: bool) -> Response:
    arrival = time.monotonic()
    endpoint = "chat_completions" if chat else "completions"
    metrics = gateway.metrics
    gen: Generation | None = None
    handed_off = False
    try:
        body, size = await _read_json(request, gateway)  # before taking a slot: a slow sender holds none
        gateway.admit()
        try:
            if size > _INLINE_BODY_BYTES:  # tokenizing a big prompt would stall every other request
                job = await asyncio.to_thread(prepare.prepare_generation, gateway, body, chat)
            else:
                job = prepare.prepare_generation(gateway, body, chat)
            gen = gateway.generate(job.prompts, job.params, arrival)
            builder = ResponseBuilder(chat=chat, request_id=gen.request_id, model=gateway.config.model_name,
                                      num_choices=len(job.prompts) * job.params.n, n=job.params.n,
                                      num_top_logprobs=job.num_top_logprobs, token_text=gateway.token_text,
                                      include_usage=job.include_usage, continuous_usage=job.continuous_usage,
                                      num_prompt_tokens=gen.num_prompt_tokens, chat_output=job.chat_output,
                                      echo=job.echo, echo_token_ids=job.prompts if job.echo is not None else None,
                                      prompt_logprobs=gen.prompt_logprobs.get,
                                      num_prompt_logprobs=job.num_prompt_logprobs)
            headers = {"X-Request-Id": gen.request_id}
            if not job.stream:
                result = await _until_disconnect(request, _collect(gen, builder))
                metrics.requests.labels(endpoint, "success").inc()
                return JSONResponse(result, headers=headers)
            first = await _until_disconnect(request, gen.next())
            response = _SSEResponse(gateway, gen, builder, first, endpoint, headers=headers)
            handed_off = True
            return response
        finally:
            if not handed_off:
                if gen is not None:
                    gen.cancel()
                gateway.release()
    except APIError as e:
        metrics.requests.labels(endpoint, _outcome(e)).inc()
        raise
    except ClientGone:
        metrics.requests.labels(endpoint, "cancelled").inc()
        return Response(status_code=499)  # nobody reads it
    except Exception:
        metrics.requests.labels(endpoint, "error").inc()
        raise


async def _read_json(request: Request, gateway: Gateway) -> tuple[Any, int]:
    """The decoded body and its size in bytes (read within the limits of ``limits.read_body``)."""
    body = await read_body(request, gateway.config, gateway.body_budget)
    try:
        return json.loads(body, parse_constant=_reject_constant), len(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid("the request body nests objects and arrays too deeply") from None


async def _answer(gateway: Gateway, request: Request, handle: Callable[[Gateway, Any], dict[str, Any]]) -> Response:
    """A small JSON request (``/tokenize``, ``/detokenize``): read, bounded, answered."""
    try:
        body, size = await _read_json(request, gateway)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    if size > _INLINE_BODY_BYTES:
        return JSONResponse(await asyncio.to_thread(handle, gateway, body))
    return JSONResponse(handle(gateway, body))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled ourselves (server shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


async def _wait_disconnect(request: Request) -> None:
    # The body was read already, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(gen: Generation, builder: ResponseBuilder) -> dict[str, Any]:
    while (delta := await gen.next()) is not None:
        builder.add(delta)
    return builder.body(gen.num_prompt_tokens, gen.num_completion_tokens, gen.num_cached_tokens)


_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""``json.dumps`` with these options builds a new encoder per call; this is one per process."""


def _sse(data: Any) -> bytes:
    return b"data: " + _encode_json(data).encode() + b"\n\n"


class _SSEResponse(StreamingResponse):
    """The event stream of one request; owns its Generation and in-flight slot until the
    stream ends, whether it completes, fails, or the client disconnects."""

    def __init__(self, gateway: Gateway, gen: Generation, builder: ResponseBuilder, first: Any, endpoint: str,
                 headers: dict[str, str]) -> None:
        self.gateway, self.gen, self.builder, self.endpoint = gateway, gen, builder, endpoint
        self.outcome = "cancelled"
        super().__init__(self._events(first), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **headers})

    async def _events(self, delta: Any):
        gen, builder = self.gen, self.builder
        try:
            events = [_sse(chunk) for chunk in builder.start_chunks()]
            while delta is not None:
                # Everything that arrived while we waited or wrote goes out in one write.
                for d in coalesce([delta, *gen.ready()]):
                    events.extend(_sse(chunk) for chunk in builder.chunks(d))
                if events:
                    yield b"".join(events)
                    events = []
                delta = await gen.next()
            if builder.include_usage:
                yield _sse(builder.usage_chunk(gen.num_prompt_tokens, gen.num_completion_tokens,
                                               gen.num_cached_tokens))
            self.outcome = "success"
        except APIError as e:
            self.outcome = _outcome(e)
            yield _sse(e.body())
        except Exception:  # noqa: BLE001 - a bug must still end the stream visibly
            log.exception("request %s: the event stream failed", gen.request_id)
            self.outcome = "error"
            yield _sse(APIError(500, "internal server error", type="server_error", code="internal_error").body())
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, timed_send(send, self.gateway.config.send_timeout_s))
        except SendTimeout:
            # NOTE: the response stays incomplete; returning makes uvicorn close the
            # connection (it logs "ASGI callable returned without completing response").
            self.outcome = "send_timeout"
            log.warning("request %s: the client read nothing for %g s; ending its stream", self.gen.request_id,
                        self.gateway.config.send_timeout_s)
        finally:
            self.gen.cancel()
            self.gateway.release()
            self.gateway.metrics.requests.labels(self.endpoint, self.outcome).inc()


# -- serving ---------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the gateway with uvicorn until interrupted."""
    import uvicorn  # noqa: PLC0415

    if not is_loopback(host) and config.api_key is None:
        log.warning("the gateway listens on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key)", host)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, **uvicorn_settings(config))


class ServerThread:
    """The app under uvicorn on a free loopback port, in a background thread (for
    embedding the gateway in a process that does other work: tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", start_timeout_s: float = 30.0) -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    **uvicorn_settings(app.state.gateway.config)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
