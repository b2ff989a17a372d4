"""The ingress's side of the router's streams: one subscription per ingress, and requests that
outlive their router.

`RouterOutputs` holds one `RouterActor.subscribe` stream for all the requests an ingress (a Serve
replica, or `Deployment.generate`) submits, and hands each request its items: one Ray message per
router step instead of one per request per step, which is what a busy router's CPU goes to. Each
subscribe has a new name and each submission a new tag, so a late or repeated call to a router
that was restarting can never steer items to the wrong stream.

When the router process dies mid-request, Ray restarts it (`max_restarts=-1`),
`Deployment.revive_router` brings the new one into service, `RouterOutputs` subscribes to it, and
`resumable_stream` resubmits each open request with what its client already has — the generated
token ids and text (`Resume`) — so the stream goes on with no token missing and none repeated.
Why the ingress: it is the one place that knows exactly what reached the client. Greedy requests
continue with the tokens the old router would have produced; seeded ones too, because a seeded
request's n-th draw depends only on (seed, n) (`Engine._sample`).
"""

import asyncio
import itertools
import logging
import time
import uuid
from typing import AsyncIterator

from ray.exceptions import RayActorError

from moeray.actors.engine import Resume
from moeray.actors.router_actor import RouterRestarting
from moeray.actors.sequence import SamplingParams
from moeray.cluster.remote_errors import unwrap

log = logging.getLogger("moeray.resume")
ROUTER_RETURN_TIMEOUT_S = 120.0  # a router not serving again by then fails the request
FIRST_RETRY_S, MAX_RETRY_S = 0.05, 0.5


class RouterUnavailableError(RuntimeError):
    """The router died and was not back in time: the request fails (HTTP 503, gRPC UNAVAILABLE)."""


class RouterGone(RuntimeError):
    """The subscription broke (the router died): every open request resubmits."""


def router_gone(err: BaseException) -> bool:
    """Is this the router's process dying or restarting (worth resubmitting), not the request's own error?"""
    return isinstance(err, RayActorError | RouterGone | asyncio.TimeoutError) or isinstance(unwrap(err), RouterRestarting)


class RouterOutputs:
    """One subscription to the router, shared by every request of this ingress (one event loop)."""

    def __init__(self, router, name: str | None = None):
        self.router, self.name = router, name or f"ingress-{uuid.uuid4().hex[:12]}"
        self.subscription: str | None = None  # "NAME:N", the one open now
        self.queues: dict[str, asyncio.Queue] = {}  # submission tag -> its items, while it streams
        self.subscribed: asyncio.Event | None = None
        self._reader: asyncio.Task | None = None
        self._numbers = itertools.count()

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams, client: str | None,
                     resume: Resume | None = None) -> AsyncIterator[dict]:
        """Submit one request and yield its items until it finishes. Raises the request's own error,
        or RouterGone if the router died meanwhile."""
        if self._reader is None or self._reader.done():
            self.subscribed = asyncio.Event()
            self._reader = asyncio.get_running_loop().create_task(self._read())
        tag = f"{request_id}#{next(self._numbers)}"
        items: asyncio.Queue = asyncio.Queue()
        self.queues[tag] = items
        try:
            await asyncio.wait_for(self.subscribed.wait(), ROUTER_RETURN_TIMEOUT_S)
            await self.router.submit.remote(self.subscription, request_id, tag, prompt_ids, params, client, resume)
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item["finished"]:
                    return
        finally:
            del self.queues[tag]

    async def _read(self) -> None:
        """Subscribe, hand items out; when the stream breaks, tell every open request and subscribe again."""
        delay = FIRST_RETRY_S
        while True:
            self.subscription = f"{self.name}:{next(self._numbers)}"
            try:
                async for ref in self.router.subscribe.remote(self.subscription):
                    batch = await ref
                    self.subscribed.set()
                    delay = FIRST_RETRY_S
                    for tag, item in batch.items():
                        if (items := self.queues.get(tag)) is not None:
                            items.put_nowait(item)
                raise RouterGone("the router ended the stream (it shut down, or a newer subscription replaced it)")
            except Exception as err:
                self.subscribed.clear()
                if not router_gone(err):
                    log.warning("router subscription failed: %s: %s", type(err).__name__, err)
                for items in self.queues.values():
                    items.put_nowait(RouterGone(f"the router stream broke: {type(err).__name__}"))
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_S, delay * 2)


async def resumable_stream(outputs: RouterOutputs, prompt_ids: list[int], params: SamplingParams, request_id: str,
                           client: str | None, timeout_s: float = ROUTER_RETURN_TIMEOUT_S) -> AsyncIterator[dict]:
    """One request's items (`RouterOutputs.stream`), resubmitted with a `Resume` after each router
    death, until it finishes. Errors of the request itself pass through; a router gone for longer
    than `timeout_s` raises RouterUnavailableError."""
    output_ids: list[int] = []
    text = ""
    lost_at = None  # when the router was last seen gone (None while streaming)
    delay = FIRST_RETRY_S
    while True:
        resume = Resume(tuple(output_ids), text) if output_ids else None
        try:
            async for item in outputs.stream(request_id, prompt_ids, params, client, resume):
                if lost_at is not None:
                    log.warning("request %s resumed after %.2f s with %d tokens already streamed",
                                request_id, time.monotonic() - lost_at, len(output_ids))
                    lost_at, delay = None, FIRST_RETRY_S
                output_ids += item["token_ids"]
                text += item["text"]
                yield item
                if item["finished"]:
                    return
            return
        except Exception as err:
            if not router_gone(err):
                raise
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > timeout_s:
                raise RouterUnavailableError(f"the router died and was not serving again within {timeout_s:.0f} s "
                                             f"(request {request_id}, {len(output_ids)} tokens streamed)") from err
        await asyncio.sleep(delay)
        delay = min(MAX_RETRY_S, delay * 2)
