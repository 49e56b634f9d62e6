"""Micro-batching: images of concurrent requests share one forward pass.

One asyncio task collects queued images into a batch (at most ``max_batch``) and runs the model in a
single inference thread, so the event loop keeps accepting and decoding requests meanwhile. While
requests announced with :meth:`MicroBatcher.incoming` are still being decoded, an unfilled batch waits
for them, at most ``max_wait_ms``; an idle server never waits, so a lone request is answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_Queue = asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]]


@dataclass
class BatchStats:
    """Counters for /healthz: forward passes, images, largest batch."""

    batches: int = 0
    images: int = 0
    largest: int = 0


class NotRunning(RuntimeError):
    """The micro-batcher is stopped or not started: the images are not scored."""


class MicroBatcher:
    """Batches single images (HxWx3 uint8) for ``model`` (NxHxWx3 uint8 -> N x C float32)."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float) -> None:
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: _Queue | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._waiting: set[asyncio.Future[np.ndarray]] = set()  # images queued or being scored
        self._incoming = 0

    async def start(self) -> None:
        """Start the batching task and its inference thread (again after :meth:`stop`)."""
        self._queue = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="imgclf-infer")
        self._task = asyncio.create_task(self._loop(self._queue, self._thread), name="imgclf-batcher")

    async def stop(self) -> None:
        """Stop the batching task; images queued or being scored fail with :class:`NotRunning`."""
        task, thread = self._task, self._thread
        self._queue = self._task = self._thread = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for fut in self._waiting:
            if not fut.done():
                fut.set_exception(NotRunning("the server stopped before scoring this image"))
        self._waiting.clear()
        if thread is not None:  # let a running forward pass end, so a restart never runs two at once
            await asyncio.to_thread(thread.shutdown)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request whose images are being decoded (an unfilled batch may wait for them)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def infer(self, images: list[np.ndarray]) -> np.ndarray:
        """Model outputs of ``images`` (one row each), computed in shared batches."""
        if self._queue is None:
            raise NotRunning("the micro-batcher is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._waiting.add(fut)
            fut.add_done_callback(self._waiting.discard)
            self._queue.put_nowait((image, fut))
            futures.append(fut)
        return np.stack(await asyncio.gather(*futures))

    async def _collect(self, queue: _Queue) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        items = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(items) < self.max_batch:
            if not queue.empty():
                items.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if self._incoming == 0 or remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [(image, fut) for image, fut in items if not fut.done()]

    async def _loop(self, queue: _Queue, thread: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect(queue)
            if not items:
                continue
            batch = np.stack([image for image, _ in items])
            try:
                out = await loop.run_in_executor(thread, self.model, batch)
            except Exception as e:  # the error goes to the waiting requests; the loop lives on
                log.exception("inference failed on a batch of %d images", len(items))
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.images += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            for (_, fut), row in zip(items, out, strict=True):
                if not fut.done():
                    fut.set_result(row)
