import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from memshare.config import EngineConfig
from memshare.engine.llm_engine import LLMEngine
from memshare.outputs import RequestOutput
from memshare.sampling_params import SamplingParams

logger = logging.getLogger("memshare")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the server can no longer generate."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    snapshots: bool  # False: only the finished output is published
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_tokens: int = -1

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class AsyncLLM:
    """One engine loop in a thread serving many asyncio callers: continuous batching across HTTP requests.

    `generate` yields a snapshot of the request after every engine step that added a token, the last one
    finished (only that one with `stream=False`). Leaving the iteration early (a client disconnect cancels
    it) aborts the request and frees its KV blocks at the next step.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.stats = self.engine.get_stats()
        self.error: BaseException | None = None
        self.num_aborted = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memshare-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its snapshots; raises the engine's typed error if it is invalid."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop has stopped")
        loop = asyncio.get_running_loop()
        stream, added = _Stream(loop, snapshots=stream), loop.create_future()
        self._commands.put(("add", request_id, prompt_token_ids, params, stream, added))
        finished = False
        try:
            await added
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        """Abort what is still running and stop the engine thread."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._handle_commands(block=not engine.has_unfinished_requests())
                if engine.has_unfinished_requests():
                    self._publish(engine.step())
                self.stats = engine.get_stats()
        except Exception as error:
            logger.exception("engine loop failed")
            self.error = error
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id)
            stream.put(self.error or EngineDeadError("the server is shutting down"))

    def _handle_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
            while True:
                if command[0] == "add":
                    self._add(*command[1:])
                elif command[0] == "abort":
                    self._abort(command[1])
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _add(self, request_id: str, token_ids: list[int], params: SamplingParams, stream: _Stream,
             added: asyncio.Future) -> None:
        try:
            self.engine.add_request(request_id, token_ids, params, token_ids)
        except Exception as error:
            stream.loop.call_soon_threadsafe(_settle, added, error)
            return
        self._streams[request_id] = stream
        stream.loop.call_soon_threadsafe(_settle, added, None)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            self.num_aborted += 1

    def _publish(self, finished: list[RequestOutput]) -> None:
        for output in finished:
            stream = self._streams.pop(output.request_id, None)
            if stream is not None:
                stream.put(output)
        for request_id, stream in self._streams.items():
            if not stream.snapshots:
                continue
            num_tokens = sum(len(seq.token_ids) for seq in self.engine.sequences(request_id))
            if num_tokens != stream.num_tokens:
                stream.num_tokens = num_tokens
                stream.put(self.engine.snapshot(request_id))


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled while waiting
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
