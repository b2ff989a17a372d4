"""The KServe v2 / Triton gRPC methods of the ingress (a mixin of `cluster.frontend.Frontend`).

Ray Serve's gRPC proxy routes an RPC to the ingress method of the same name (`ModelInfer`,
`ModelStreamInfer`, ...; `Check` for grpc.health.v1) and hands a bidirectional stream over as a
`gRPCInputStream`. One `ModelStreamInfer` call carries every request a tritonclient stream
sends, so each request runs as its own task and a bad one is answered in-band (`error_message`)
while the others go on. Needs `self.router`, `self.model` (a ServedModel) and `self._items`.
"""

import asyncio
import uuid
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from moeray.actors.sequence import SamplingParams
from moeray.cluster.kserve import kserve_pb2 as pb
from moeray.cluster.remote_errors import unwrap
from moeray.cluster.kserve.kserve import (
    LLMRequest, RequestError, build_response, empty_final_response, model_metadata_response, model_ready_response,
    parse_infer_request, server_live_response, server_metadata_response, server_ready_response, stream_error)

SERVICER_FUNCTIONS = [  # what Serve's gRPC proxy registers (import paths)
    "moeray.cluster.kserve.kserve.add_servicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "moeray.cluster.kserve.services.add_reflection_to_serve_proxy",
]


class KServeIngress:
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return server_live_response(True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return server_ready_response(await self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return model_ready_response(request, self.model.name, await self._is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return server_metadata_response()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context) -> pb.ModelMetadataResponse:
        try:
            return model_metadata_response(request, self.model.name)
        except RequestError as err:
            _fail(grpc_context, err)

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        serving = health_pb2.HealthCheckResponse.SERVING if await self._is_ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=serving)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context) -> pb.ModelInferResponse:
        try:
            llm = parse_infer_request(request, self.model.name, max_bytes=self.max_request_bytes)
            responses = [r async for r in self._kserve_responses(llm, _carrier(grpc_context))]
        except RequestError as err:
            _fail(grpc_context, err)
        return responses[-1]

    async def ModelStreamInfer(self, request_stream, grpc_context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        out: asyncio.Queue = asyncio.Queue()

        carrier = _carrier(grpc_context)

        async def run(request: pb.ModelInferRequest) -> None:
            try:
                llm = parse_infer_request(request, self.model.name, streaming_rpc=True, max_bytes=self.max_request_bytes)
                async for response in self._kserve_responses(llm, carrier):
                    await out.put(pb.ModelStreamInferResponse(infer_response=response))
            except RequestError as err:
                await out.put(stream_error(err.message, request.id, self.model.name))

        async def read() -> None:
            tasks = [asyncio.create_task(run(request)) async for request in request_stream]
            await asyncio.gather(*tasks)
            await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await out.get()) is not None:
                yield response
        finally:
            reader.cancel()

    async def _kserve_responses(self, llm: LLMRequest, carrier: dict[str, str]) -> AsyncIterator[pb.ModelInferResponse]:
        """Responses to one request: one per step's new text when streaming, else one with all of it."""
        try:
            params = SamplingParams(**llm.sampling)
        except (TypeError, ValueError) as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling_parameters: {err}") from None
        prompt_ids = self.model.tokenizer.encode(llm.text)
        text, num_output_tokens, unreported, reason = "", 0, 0, None
        try:
            async for item in self._items(prompt_ids, params, f"kserve-{uuid.uuid4().hex}", "text_completion", carrier):
                num_output_tokens += len(item["token_ids"])
                unreported += len(item["token_ids"])  # tokens whose text is held back count with the next response
                reason = item["finish_reason"]
                if llm.stream:
                    if item["text"] or item["finished"]:
                        yield self._kserve_response(llm, item["text"], reason, len(prompt_ids), unreported, item["finished"])
                        unreported = 0
                else:
                    text += item["text"]
        except Exception as err:  # the router's refusal or failure, as a status code
            raise _router_error(err) from None
        if not llm.stream:
            text = text if llm.exclude_input_in_output else llm.text + text
            yield self._kserve_response(llm, text, reason, len(prompt_ids), num_output_tokens, True)
        elif llm.empty_final_response and reason is None:
            yield empty_final_response(self.model.name, llm.request_id)

    def _kserve_response(self, llm: LLMRequest, text: str, reason: str | None, num_input: int, num_output: int,
                  final: bool) -> pb.ModelInferResponse:
        return build_response(self.model.name, llm.request_id, text, finish_reason=reason if final else None,
                              num_input_tokens=num_input, num_output_tokens=num_output, final=final, outputs=llm.outputs)

    async def _is_ready(self) -> bool:
        """Serving, with no step-loop error (a router being restarted is not ready)."""
        from ray.exceptions import RayActorError

        try:
            return await self.router.state.remote() == "serving" and (await self.router.stats.remote())["error"] is None
        except RayActorError:
            return False


def _router_error(err: BaseException) -> RequestError:
    """The router's exception (unwrapped from Ray's) -> the gRPC status a client should see."""
    from moeray.actors.router_actor import OverloadedError
    from moeray.cluster.resume import RouterUnavailableError

    cause = unwrap(err)
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, OverloadedError):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause))
    if isinstance(cause, RouterUnavailableError):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(cause))
    if isinstance(cause, ValueError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(cause))
    return RequestError(grpc.StatusCode.INTERNAL, f"{type(cause).__name__}: {cause}")


def _carrier(grpc_context) -> dict[str, str]:
    """The call's metadata as a W3C trace-context carrier (Ray's gRPC proxy also lifts traceparent out)."""
    carrier = {key: value for key, value in (grpc_context.invocation_metadata() or []) if isinstance(value, str)}
    for key in ("traceparent", "tracestate"):
        value = getattr(grpc_context, key, None)
        value = value() if callable(value) else value
        if isinstance(value, str) and value and key not in carrier:
            carrier[key] = value
    return carrier


def _fail(grpc_context, err: RequestError):
    """Unary RPCs: Serve keeps a status set on the context when the method raises."""
    grpc_context.set_code(err.code)
    grpc_context.set_details(err.message)
    raise err
