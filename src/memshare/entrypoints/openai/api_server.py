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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from memshare.config import EngineConfig, ServerConfig
from memshare.entrypoints.openai.async_engine import AsyncLLM, EngineDeadError
from memshare.entrypoints.openai.metrics import ServerMetrics
from memshare.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
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


def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str) -> FastAPI:
    """The FastAPI app; `llm` is shut down when the app's lifespan ends."""
    metrics = ServerMetrics(lambda: {**llm.stats, "num_aborted": llm.num_aborted})
    serving = OpenAIServing(llm, config, model_name, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        llm.shutdown()

    def error_response(error: APIError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    app = FastAPI(title="memshare", lifespan=lifespan)
    app.add_middleware(_Guard, config=config, reject=error_response)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"request body is not valid JSON: {first.get('msg')}"))
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return error_response(APIError(503, str(error)))

    @app.exception_handler(MemShareError)
    async def bad_input(_: Request, error: MemShareError) -> JSONResponse:
        return error_response(APIError(400, str(error)))

    @app.get("/health")
    async def health() -> Response:
        if llm.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await run(serving.completion_job(body), raw)

    @app.post("/v1/chat/completions")
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
