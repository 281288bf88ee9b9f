"""Micro-batching of gallery adds: concurrent ``POST /api/gallery`` requests encoded in one model pass.

A request joins the queue; the first one waits at most :data:`WINDOW_S` (or until
:data:`BATCH_IMAGES` images are waiting) for others, then every waiting request, whole, up to
:data:`BATCH_IMAGES` images, is decoded, encoded as one batch and stored in one transaction by
:meth:`~finegrain.gallery.live.LiveGallery.add_many`. Requests that arrive while a batch is encoded
form the next one. Each request is answered when its own images are stored (durable), with its own
ids or its own error: a bad image refuses its request only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from finegrain.errors import FinegrainError
from finegrain.gallery.live import AddRequest

BATCH_IMAGES = 32
"""Images encoded in one batch at most (a request larger than this is a batch of its own)."""
WINDOW_S = 0.01
"""How long the first request of a batch waits for others to join it."""

AddMany = Callable[[list[AddRequest]], Awaitable[list[list[int] | FinegrainError]]]


@dataclass
class _Waiting:
    request: AddRequest
    answer: asyncio.Future[list[int]]


class AddBatches:
    """Gathers adds into batches and runs them through ``add_many`` one batch at a time."""

    def __init__(self, add_many: AddMany, batch_images: int = BATCH_IMAGES, window_s: float | None = None) -> None:
        self.add_many = add_many
        self.batch_images = batch_images
        self.window_s = WINDOW_S if window_s is None else window_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Waiting] = []
        self._full = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def add(self, request: AddRequest) -> list[int]:
        """The ids of ``request``'s images once they are stored; its error if it was refused."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # an app served again (tests): nothing of the last loop's is kept
            self._loop, self._waiting, self._full, self._worker = loop, [], asyncio.Event(), None
        answer: asyncio.Future[list[int]] = loop.create_future()
        self._waiting.append(_Waiting(request, answer))
        if sum(len(w.request.images) for w in self._waiting) >= self.batch_images:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await answer

    def _next_batch(self) -> list[_Waiting]:
        """The waiting requests, whole and in order, up to :attr:`batch_images` images (at least one)."""
        batch: list[_Waiting] = []
        images = 0
        while self._waiting and (not batch or images + len(self._waiting[0].request.images) <= self.batch_images):
            w = self._waiting.pop(0)
            batch.append(w)
            images += len(w.request.images)
        if sum(len(w.request.images) for w in self._waiting) < self.batch_images:
            self._full.clear()
        return batch

    async def _drain(self) -> None:
        """Run batches until no request waits (a worker lives only while there is work)."""
        try:
            await asyncio.wait_for(self._full.wait(), self.window_s)
        except TimeoutError:
            pass
        while self._waiting:
            batch = self._next_batch()
            try:
                results = await self.add_many([w.request for w in batch])
            except Exception as e:  # the store or the model failed: every request of the batch hears it
                for w in batch:
                    if not w.answer.done():
                        w.answer.set_exception(e)
                continue
            except BaseException:  # cancelled (the server stops): so are the requests waiting on it
                for w in batch + self._waiting:
                    w.answer.cancel()
                raise
            for w, result in zip(batch, results, strict=True):
                if w.answer.done():  # its client went away: what it sent is stored all the same
                    continue
                if isinstance(result, FinegrainError):
                    w.answer.set_exception(result)
                else:
                    w.answer.set_result(result)
