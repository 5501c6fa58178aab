"""`memshare serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine loop."""

import asyncio
import hmac
import json
import logging
import signal
from collections.abc import Callable
from contextlib import aclosing, asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.exceptions import HTTPException

from memshare.config import EngineConfig, ServerConfig
from memshare.entrypoints.openai.async_engine import AsyncLLM, EngineDeadError
from memshare.entrypoints.openai.metrics import ServerMetrics
from memshare.entrypoints.openai.protocol import ERROR_SCHEMA, APIError, ChatCompletionRequest, CompletionRequest
from memshare.entrypoints.openai.serving import OpenAIServing
from memshare.errors import MemShareError
from memshare.outputs import RequestOutput

logger = logging.getLogger("memshare")


class _Guard:
    """ASGI middleware: the API key on /v1 routes, and the request-body size limit while the body is read."""

    def __init__(self, app, config: ServerConfig, reject: Callable[[APIError], JSONResponse]) -> None:
        self.app, self.config, self.reject = app, config, reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = self.config.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                error = APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await self.reject(error)(scope, receive, send)
        limit = self.config.max_request_bytes
        if int(headers.get(b"content-length", b"0") or 0) > limit:
            return await self.reject(APIError(413, f"request body exceeds {limit} bytes"))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_PLAIN_0_0_4  # the text format generate_latest writes


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem as a 400 whose `param` is the parameter's OpenAI path ("messages.[0].role")."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}")
    # pydantic puts the union member it tried ("str", "list[int]", "TextPart") in the location; OpenAI's has none.
    parts = [f"[{p}]" if isinstance(p, int) else p for p in first["loc"][1:]
             if isinstance(p, int) or p.isidentifier() and p.islower() and p not in ("str", "int", "float", "bool")]
    param = ".".join(parts) or None
    if "error" in first.get("ctx", {}):  # our validators' messages name the parameter already
        return APIError(400, str(first["ctx"]["error"]), param)
    return APIError(400, f"{param or 'request body'}: {first['msg']}", param)


def _errors(config: ServerConfig, *statuses: int) -> dict:
    """OpenAPI responses: each error status with why the server answers it and the OpenAI error body."""
    why = {400: "Malformed JSON, a field of the wrong type, an out-of-range or unsupported parameter (named in "
                "`param`), or a prompt that does not fit the context with max_tokens",
           401: "A missing or wrong API key (`Authorization: Bearer <key>`)",
           404: "An unknown model", 405: "A method the path does not serve; `Allow` lists those it does",
           413: f"A request body over {config.max_request_bytes} bytes", 500: "An unexpected server error",
           503: "The engine has stopped: the server is shutting down or failed"}
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    responses = {status: {"description": why[status], "content": body} for status in statuses}
    if 405 in responses:
        responses[405]["headers"] = {"Allow": {"description": "The methods of the path", "schema": {"type": "string"}}}
    return responses


def _document(schema: dict, config: ServerConfig, model_name: str) -> dict:
    """FastAPI's OpenAPI document with what it cannot know: no 422 (validation errors are 400s), the model served,
    the request limits of this server, and the API key."""
    schemas = schema["components"]["schemas"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if config.api_key and path.startswith("/v1"):
                operation["security"] = [{"apiKey": []}]
    if config.api_key:
        schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schemas[name]["properties"]
        properties["model"]["examples"] = [model_name]
        properties["n"]["maximum"] = config.max_n
        for field in ("max_tokens", "max_completion_tokens"):
            for branch in properties.get(field, {}).get("anyOf", ()):
                if branch.get("type") == "integer":
                    branch["maximum"] = config.max_tokens_limit
    return schema


def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str) -> FastAPI:
    """The FastAPI app; `llm` is shut down when the app's lifespan ends."""
    metrics = ServerMetrics(lambda: {**llm.stats, "num_aborted": llm.num_aborted}, model_name)
    serving = OpenAIServing(llm, config, model_name, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        llm.shutdown()

    def error_response(error: APIError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    app = FastAPI(title="memshare", lifespan=lifespan)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                           config, model_name)
        return app.openapi_schema

    app.openapi = openapi
    common = (405, 413, 401) if config.api_key else (405, 413)
    app.add_middleware(_Guard, config=config, reject=error_response)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail), headers=error.headers))  # 405: Allow

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return error_response(APIError(503, str(error)))

    @app.exception_handler(MemShareError)
    async def bad_input(_: Request, error: MemShareError) -> JSONResponse:
        return error_response(APIError(400, str(error)))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}"))

    health_schema = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}

    @app.get("/health", responses={**_errors(config, 405, 413),
                                   503: {"description": "The engine has stopped",
                                         "content": {"application/json": {"schema": health_schema}}}})
    async def health() -> Response:
        if llm.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    @app.get("/metrics", response_class=PrometheusResponse, responses=_errors(config, 405, 413))
    async def prometheus() -> Response:
        return PrometheusResponse(metrics.render())

    @app.get("/v1/models", responses=_errors(config, *common))
    async def models() -> dict:
        return serving.models()

    async def run(job, raw: Request) -> Response:
        if job.stream:
            return StreamingResponse(serving.stream(job, serving.outputs(job)), media_type="text/event-stream")

        async def collect() -> dict[int, RequestOutput]:
            async with aclosing(serving.outputs(job)) as outputs:
                return {index: output async for index, output in outputs}

        collecting = asyncio.ensure_future(collect())
        disconnected = asyncio.ensure_future(raw.receive())  # the body is read: the next message is a disconnect
        await asyncio.wait((collecting, disconnected), return_when=asyncio.FIRST_COMPLETED)
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()  # aborts the engine requests; their blocks are freed at the next step
            await asyncio.gather(collecting, return_exceptions=True)
            return Response(status_code=499)
        return JSONResponse(serving.response(job, collecting.result()))

    # Before OpenAPI 3.2 an event stream's schema is each event's: `data` is a JSON chunk, an error, or [DONE].
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    stream = {"description": "The completion; server-sent events with stream=true",
              "content": {"text/event-stream": {"schema": event}}}
    generation_errors = {200: stream, **_errors(config, *common, 400, 404, 500, 503)}

    @app.post("/v1/completions", responses=generation_errors)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await run(serving.completion_job(body), raw)

    @app.post("/v1/chat/completions", responses=generation_errors)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await run(serving.chat_job(body), raw)

    return app


def run_server(engine_config: EngineConfig, config: ServerConfig) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then finish in-flight requests within the shutdown timeout."""
    llm = AsyncLLM(engine_config)
    name = config.served_model_name or engine_config.model
    app = build_app(llm, config, name)
    logger.info("serving %s on http://%s:%d/v1 (%s)", name, config.host, config.port,
                json.dumps({"share": engine_config.share.policy, "max_model_len": llm.max_model_len,
                            "num_kv_blocks": llm.stats["num_kv_blocks"]}))
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=config.shutdown_timeout))
    # uvicorn re-raises the signal once its graceful shutdown is done; handled, the process exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: logger.info("shutdown complete"))
    try:
        server.run()
    finally:
        llm.shutdown()
