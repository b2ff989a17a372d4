"""The ingress on Ray Serve: OpenAI-compatible HTTP (here) and KServe v2 gRPC (`KServeIngress`),
both streaming from the router.

It owns no model state: it parses and validates requests (`cluster.openai`), streams the
router's per-step items (one `RouterActor.subscribe` stream per replica for all its requests,
resubmitted if the router dies: `cluster.resume`) and writes them out as OpenAI responses or SSE events. Requests from every client meet in the router's batch. A
client that goes away mid-stream has its request aborted, which frees its sequence and KV.
"""

import json
import time
from typing import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from moeray.cluster import admin, telemetry
from moeray.cluster.identity import client_identity
from moeray.cluster.kserve.ingress import KServeIngress
from moeray.cluster.openai.convert import GenerateRequest, convert_chat, convert_completion, parse_request
from moeray.cluster.openai.errors import OpenAIError, from_exception, from_validation_error, too_large
from moeray.cluster.openai.protocol import ChatCompletionRequest, CompletionRequest
from moeray.cluster.openai.responses import SSEStream, chat_response, completion_response, model_list, sse_error
from moeray.cluster.openai.served_model import ServedModel
from moeray.cluster.resume import RouterOutputs, resumable_stream

app = FastAPI(title="moeray", docs_url=None, redoc_url=None)


@app.exception_handler(RequestValidationError)
async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    return _error(from_validation_error(err.errors()))


def _error(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status_code)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Frontend(KServeIngress):
    def __init__(self, router, model_path: str, served_name: str, controller=None, admin_token: str | None = None,
                 max_request_bytes: int = 4 << 20):
        self.router, self.controller, self.admin_token = router, controller, admin_token
        self.outputs = RouterOutputs(router)  # this replica's one stream of every request's items
        self.max_request_bytes = max_request_bytes
        self.tracer, self.metrics = telemetry.tracer(), telemetry.request_metrics()
        limits = ray.get(router.limits.remote())
        self.model = ServedModel.load(model_path, served_name, limits["max_model_len"], limits["vocab_size"])

    @app.get("/health")
    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        return Response(status_code=200 if await self._is_ready() else 503)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(model_list(self.model).model_dump())

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            call = convert_completion(parse_request(CompletionRequest, await self._body(request)), self.model)
        except OpenAIError as err:
            return _error(err)
        return await self._respond(call, dict(request.headers))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            call = convert_chat(parse_request(ChatCompletionRequest, await self._body(request)), self.model)
        except OpenAIError as err:
            return _error(err)
        return await self._respond(call, dict(request.headers))

    @app.get("/admin/placement")
    async def admin_placement(self, request: Request) -> Response:
        return await self._admin(request, self._placement)

    @app.get("/admin/stats")
    async def admin_stats(self, request: Request) -> Response:
        async def body():
            window = admin.parse_window(request.query_params.get("window_s")) or 10.0
            stats, steps = await self.router.stats.remote(), await self.router.step_log.remote(time.time() - window)
            return {"router": stats, "throughput": admin.throughput(steps, window)}

        return await self._admin(request, body)

    @app.get("/admin/clients")
    async def admin_clients(self, request: Request) -> Response:
        return await self._admin(request, lambda: admin.call(self.router.clients.remote()))

    @app.get("/admin/load")
    async def admin_load(self, request: Request) -> Response:
        async def body():
            window = admin.parse_window(request.query_params.get("window_s"))
            return await admin.call(self.router.load_snapshot.remote(window))

        return await self._admin(request, body)

    @app.get("/admin/policy")
    async def admin_policy(self, request: Request) -> Response:
        return await self._admin(request, lambda: admin.call(self.controller.policy.remote()), controller=True)

    @app.put("/admin/policy")
    async def admin_apply_policy(self, request: Request) -> Response:
        source = request.headers.get("x-policy-source", "<policy>")
        text = (await request.body()).decode("utf-8", errors="replace")
        return await self._admin(request, lambda: admin.call(self.controller.apply_policy.remote(text, source)),
                                 controller=True)

    @app.post("/admin/migrate")
    async def admin_migrate(self, request: Request) -> Response:
        async def body():
            return await admin.call(self.controller.migrate.remote(**admin.parse_migrate(await request.body())))

        return await self._admin(request, body, controller=True)

    @app.post("/admin/scale")
    async def admin_scale(self, request: Request) -> Response:
        async def body():
            return await admin.call(self.controller.scale.remote(admin.parse_scale(await request.body())))

        return await self._admin(request, body, controller=True)

    @app.get("/admin/autoscaler")
    async def admin_autoscaler(self, request: Request) -> Response:
        async def body():
            limit = admin.parse_limit(request.query_params.get("limit"))
            return {"status": await self.controller.status.remote(), "history": await self.controller.history.remote(limit)}

        return await self._admin(request, body, controller=True)

    async def _placement(self) -> dict:
        plan, stats = json.loads(await self.router.plan_json.remote()), await self.router.stats.remote()
        return {"plan": plan, "router": stats}

    async def _admin(self, request: Request, handler, controller: bool = False) -> Response:
        try:
            admin.authorize(request.headers.get("authorization"), self.admin_token)
            if controller:
                admin.need_controller(self.controller)
            return JSONResponse(await handler())
        except admin.AdminError as err:
            return err.response()

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) past `max_request_bytes` — by its Content-Length before reading any of it."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large(int(declared), self.max_request_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large(None, self.max_request_bytes)
        return bytes(body)

    async def _respond(self, call: GenerateRequest, headers: dict[str, str]) -> Response:
        items = self._items(call.prompt_ids, call.params, call.request_id,
                            "chat" if call.kind == "chat" else "text_completion", headers)
        try:
            first = await anext(items)  # errors before any output become a status code, not an event
        except Exception as err:  # the router's refusal (bad request, overload) or failure
            await items.aclose()
            return _error(from_exception(err))
        if call.stream:
            return StreamingResponse(self._sse(call, first, items), media_type="text/event-stream")
        try:
            rest = [item async for item in items]
        except Exception as err:
            return _error(from_exception(err))
        finally:
            await items.aclose()  # also when this request is cancelled: the router aborts it
        build = chat_response if call.kind == "chat" else completion_response
        return JSONResponse(build(call, [first, *rest], self.model.tokenizer).model_dump(exclude_none=True))

    async def _sse(self, call: GenerateRequest, first: dict, items: AsyncIterator[dict]) -> AsyncIterator[str]:
        stream = SSEStream(call, self.model.tokenizer)
        try:
            if event := stream.push(first):
                yield event
            async for item in items:
                if event := stream.push(item):
                    yield event
        except Exception as err:  # the router failed mid-stream: say so in the stream
            yield sse_error(from_exception(err))
            return
        finally:
            await items.aclose()  # a client that went away: the router aborts the request
        yield stream.close()

    async def _items(self, prompt_ids: list[int], params, request_id: str, operation: str = "text_completion",
                     carrier: dict[str, str] | None = None) -> AsyncIterator[dict]:
        """The router's items for one request, traced; aborts it there if we stop reading early."""
        finished, error = False, None
        span = telemetry.RequestTrace(self.tracer, operation, self.model.name, request_id, params, len(prompt_ids),
                                      carrier or {}, self.metrics) if self.tracer or self.metrics else None
        try:
            async for item in resumable_stream(self.outputs, prompt_ids, params, request_id,
                                               client_identity(carrier or {})):
                finished = item["finished"]
                if span:
                    span.item(item)
                yield item
        except BaseException as err:  # GeneratorExit too: the client went away
            error = err
            raise
        finally:
            if not finished:
                self.router.abort.remote(request_id)
            if span:
                span.end(error if not isinstance(error, GeneratorExit) else RuntimeError("the client went away"))


