"""Streams that outlive their router: when the router process dies mid-request, Ray restarts it
(`max_restarts=-1`), `Deployment.revive_router` brings the new one into service, and the ingress
resubmits each request it was streaming with what the client already has — the generated token
ids and text (`Resume`) — so the stream goes on with no token missing and none repeated.

Why the ingress: it is the one place that knows exactly what reached the client. Greedy requests
continue with the tokens the old router would have produced; seeded ones too, because a seeded
request's n-th draw depends only on (seed, n) (`Engine._sample`).
"""

import asyncio
import logging
import time
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


def router_gone(err: BaseException) -> bool:
    """Is this the router's process dying or restarting (worth resubmitting), not the request's own error?"""
    return isinstance(err, RayActorError) or isinstance(unwrap(err), RouterRestarting)


async def resumable_stream(router, prompt_ids: list[int], params: SamplingParams, request_id: str, client: str,
                           timeout_s: float = ROUTER_RETURN_TIMEOUT_S) -> AsyncIterator[dict]:
    """The router's per-step items for one request (`RouterActor.generate`), resubmitted with a
    `Resume` after each router death, until the request finishes. Errors of the request itself
    pass through; a router gone for longer than `timeout_s` raises RouterUnavailableError."""
    output_ids: list[int] = []
    text = ""
    lost_at = None  # when the router was last seen gone (None while streaming)
    delay = FIRST_RETRY_S
    while True:
        resume = Resume(tuple(output_ids), text) if output_ids else None
        try:
            async for ref in router.generate.remote(prompt_ids, params, request_id, client, resume):
                item = await ref
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
