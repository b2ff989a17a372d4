"""The KServe v2 / Triton gRPC protocol, as moeray speaks it: service registration, request
parsing, response building. Pure functions over protobuf messages; no Ray, no server.

Wire level. `kserve.proto` re-declares Triton's messages field for field (names, numbers, types)
in our own proto package `moeray.kserve.v2`, so `tritonclient` (whose `inference.*` symbols sit in
the same process-wide descriptor pool) can be imported beside us. A gRPC method path names only
the service, so `add_servicer_to_server` registers our handlers under Triton's
`/inference.GRPCInferenceService/<Method>` with our classes' (de)serializers; the bytes on the wire
are Triton's. Triton RPCs not listed in `METHODS` answer UNIMPLEMENTED.

Generated code. `kserve_pb2.py` is generated once by `python -m moeray.cluster.kserve.codegen` and
committed, rather than compiled from the .proto at import time: the latter needs grpcio-tools at
run time, and every grpcio-tools release pins protobuf to its own minor line (1.81: >= 6.33.5, < 7;
1.85: >= 7.35.1), which would fight tritonclient's protobuf < 7 and Ray's unpinned protobuf in
every environment we install into. Committed gencode needs only protobuf >= the version it was
generated for; we generate with protoc 33.5 ("gencode 6.33.5"), which protobuf 6.33.5 through 7.x
import without complaint. A unit test recompiles the .proto (when grpcio-tools is installed) and
checks that the committed descriptor matches it.

The LLM convention is that of Triton's vLLM backend: inputs `text_input` (BYTES), optional
`stream`, `exclude_input_in_output`, `return_finish_reason`, `return_num_input_tokens`,
`return_num_output_tokens` (BOOL) and `sampling_parameters` (BYTES, a JSON object); outputs
`text_output`, `finish_reason` (BYTES), `num_input_tokens`, `num_output_tokens` (UINT32). Every
streamed response carries the parameter `triton_final_response` (true on a request's last one).
"""

import enum
import importlib.metadata
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import grpc

from moeray.actors.sequence import SamplingParams
from moeray.cluster.kserve import kserve_pb2 as pb

SERVICE_NAME = "inference.GRPCInferenceService"  # Triton's; what tritonclient calls
SERVER_NAME = "moeray"
PLATFORM = "moeray"
MODEL_VERSION = "1"  # the one version of the served model; "" in a request means it
EXTENSIONS = ("parameters",)  # KServe/Triton protocol extensions we implement (request parameters)
FINAL_RESPONSE = "triton_final_response"  # response parameter: the request's last response
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"  # request parameter, set by tritonclient


class MethodKind(enum.Enum):
    UNARY = "unary"  # one request -> one response
    BIDI = "bidi"  # a stream of requests -> a stream of responses


@dataclass(frozen=True)
class Method:
    name: str  # as in the path /inference.GRPCInferenceService/<name>; also the servicer's method name
    kind: MethodKind
    request: type  # message classes from kserve_pb2
    response: type


def _methods() -> tuple[Method, ...]:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = []
    for m in service.methods:
        assert m.client_streaming == m.server_streaming, f"{m.name}: only unary and bidi RPCs are expected"
        kind = MethodKind.BIDI if m.client_streaming else MethodKind.UNARY
        methods.append(Method(m.name, kind, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)))
    return tuple(methods)


METHODS = _methods()  # read from the service in kserve.proto, in its order


def add_servicer_to_server(servicer: Any, server: grpc.Server) -> None:
    """Register `servicer` as `inference.GRPCInferenceService` on `server` (grpc.Server or grpc.aio.Server).

    `servicer` has one method per entry of METHODS, named like it: unary ones take
    `(request, context)` and return the response, `ModelStreamInfer` takes `(request_iterator,
    context)` and yields responses (async variants on an aio server). Same shape as the
    `add_*Servicer_to_server` functions grpcio-tools generates, so Ray Serve's gRPC proxy can take
    it as a `grpc_servicer_functions` entry: it calls it with a stand-in servicer and replaces each
    handler's behaviour with routing to the deployment method of the same name.
    """
    factory = {MethodKind.UNARY: grpc.unary_unary_rpc_method_handler,
               MethodKind.BIDI: grpc.stream_stream_rpc_method_handler}
    handlers = {m.name: factory[m.kind](getattr(servicer, m.name), request_deserializer=m.request.FromString,
                                        response_serializer=m.response.SerializeToString)
                for m in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # grpcio >= 1.63 also lets the core know the methods up front (what generated code does too).
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:
        add_registered(SERVICE_NAME, handlers)


# --- requests ------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request we refuse; `code` is the gRPC status to answer with, `message` says why."""

    MAX_MESSAGE = 1000  # gRPC sends it in a trailer, which has a size limit (8 KiB by default)

    def __init__(self, code: grpc.StatusCode, message: str):
        if len(message) > self.MAX_MESSAGE:
            message = message[: self.MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # crosses Ray processes (replica -> proxy) intact
        return RequestError, (self.code, self.message)


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


TEXT_INPUT = "text_input"
INPUT_DATATYPES = {  # input -> datatype; each holds exactly one element
    TEXT_INPUT: "BYTES",
    "stream": "BOOL",
    "sampling_parameters": "BYTES",
    "exclude_input_in_output": "BOOL",
    "return_finish_reason": "BOOL",
    "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL",
}
OUTPUT_DATATYPES = {  # output -> datatype, in response order; Triton's vLLM backend uses the same
    "text_output": "BYTES",
    "finish_reason": "BYTES",
    "num_input_tokens": "UINT32",
    "num_output_tokens": "UINT32",
}
_RETURN_FLAGS = {"return_finish_reason": "finish_reason", "return_num_input_tokens": "num_input_tokens",
                 "return_num_output_tokens": "num_output_tokens"}
_SAMPLING_TYPES = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
                   "stop": tuple, "ignore_eos": bool}  # = moeray.actors.sequence.SamplingParams' fields
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", tuple: "a string or a list of strings"}
_IGNORED_PARAMETERS = ("priority", "timeout")  # tritonclient's; we have no priority levels or queue timeouts
_CONTENTS_FIELD = {"BYTES": "bytes_contents", "BOOL": "bool_contents"}


@dataclass(frozen=True)
class LLMRequest:
    """One generation request, as read from a ModelInferRequest."""

    request_id: str  # the client's `id` ("" if it gave none); echoed in every response
    text: str  # the prompt
    stream: bool  # a response per new piece of text (else one response with all of it)
    sampling: dict[str, Any] = field(default_factory=dict)  # only the keys the client gave; SamplingParams' names
    exclude_input_in_output: bool = False  # False: text_output starts with the prompt (never when streaming)
    outputs: tuple[str, ...] = ("text_output",)  # which of OUTPUT_DATATYPES to return, in that order
    empty_final_response: bool = False  # the client asked for an empty response flagged final if needed


def parse_infer_request(req: pb.ModelInferRequest, model_name: str, *, streaming_rpc: bool = False,
                        max_bytes: int | None = None) -> LLMRequest:
    """ModelInferRequest -> LLMRequest; RequestError (INVALID_ARGUMENT, or NOT_FOUND for another model) if the
    request is malformed, RESOURCE_EXHAUSTED beyond `max_bytes` (Ray Serve's gRPC proxy takes messages far
    larger than gRPC's usual 4 MiB, so the cap is ours). `streaming_rpc`: it came over ModelStreamInfer
    (only there may `stream` be true).

    Sampling values come from request parameters and the `sampling_parameters` JSON (which wins a key given in
    both). Outputs: those the request names, if any (Triton returns only requested outputs), else text_output
    plus the ones the return_* inputs switch on."""
    if max_bytes is not None and (size := req.ByteSize()) > max_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the request is {size} bytes; this server takes at most {max_bytes} (max_request_bytes)")
    _check_model(req.model_name, req.model_version, model_name)
    values = _read_inputs(req)
    if TEXT_INPUT not in values:
        raise _invalid(f"input '{TEXT_INPUT}' is missing; it holds the prompt (BYTES, shape [1])")
    text = _utf8(values[TEXT_INPUT], TEXT_INPUT)
    stream = values.get("stream", False)
    if stream and not streaming_rpc:
        raise _invalid("stream=true needs the ModelStreamInfer RPC; ModelInfer returns a single response")
    exclude = values.get("exclude_input_in_output")
    if stream and exclude is False:
        raise _invalid("exclude_input_in_output=false is not allowed when streaming")

    sampling, empty_final = _read_parameters(req.parameters)
    if "sampling_parameters" in values:
        sampling.update(_read_sampling_json(values["sampling_parameters"]))
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise _invalid(f"sampling parameter {e}") from None

    produced = {"text_output"} | {out for flag, out in _RETURN_FLAGS.items() if values.get(flag, False)}
    requested = [o.name for o in req.outputs]
    for name in requested:
        if name not in OUTPUT_DATATYPES:
            raise _invalid(f"unknown output '{name}' requested; outputs are {', '.join(OUTPUT_DATATYPES)}")
    wanted = set(requested) if requested else produced
    return LLMRequest(request_id=req.id, text=text, stream=stream, sampling=sampling,
                      exclude_input_in_output=stream if exclude is None else exclude,
                      outputs=tuple(o for o in OUTPUT_DATATYPES if o in wanted), empty_final_response=empty_final)


def _check_model(name: str, version: str, model_name: str) -> None:
    if name != model_name:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'; this server serves '{model_name}'")
    if version not in ("", MODEL_VERSION):
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model '{name}' has no version '{version}'; it has version '{MODEL_VERSION}'")


def _read_inputs(req: pb.ModelInferRequest) -> dict[str, Any]:
    """-> {input name: its one element} (bytes for BYTES, bool for BOOL), every input checked."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise _invalid(f"{len(req.inputs)} inputs but {len(raw)} raw_input_contents; give one per input, in order")
    values = {}
    for i, tensor in enumerate(req.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name not in INPUT_DATATYPES:
            raise _invalid(f"unknown input '{name}'; inputs are {', '.join(INPUT_DATATYPES)}")
        if name in values:
            raise _invalid(f"input '{name}' is given twice")
        if datatype != INPUT_DATATYPES[name]:
            raise _invalid(f"input '{name}' has datatype {datatype or '(none)'}; expected {INPUT_DATATYPES[name]}")
        if list(tensor.shape) not in ([1], [1, 1]):
            raise _invalid(f"input '{name}' has shape {list(tensor.shape)}; expected [1] or [1, 1] (one element)")
        if any(key.startswith("shared_memory_") for key in tensor.parameters):
            raise _invalid(f"input '{name}' is in shared memory, which this server does not support")
        if raw and tensor.HasField("contents"):
            raise _invalid(f"input '{name}' has contents, but the request uses raw_input_contents; use one or "
                           "the other for all inputs")
        elements = _raw_elements(raw[i], datatype, name) if raw else _typed_elements(tensor, name)
        if len(elements) != 1:
            raise _invalid(f"input '{name}' has {len(elements)} elements; expected 1")
        values[name] = elements[0]
    return values


def _raw_elements(data: bytes, datatype: str, name: str) -> list:
    if datatype == "BOOL":
        return [b != 0 for b in data]
    elements, offset = [], 0  # BYTES: each element is a uint32 little-endian length, then that many bytes
    while offset < len(data):
        if offset + 4 > len(data):
            raise _invalid(f"input '{name}': raw BYTES data ends inside an element's 4-byte length prefix")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise _invalid(f"input '{name}': raw BYTES element {len(elements)} declares {size} bytes but "
                           f"{len(data) - offset} remain")
        elements.append(bytes(data[offset:offset + size]))
        offset += size
    return elements


def _typed_elements(tensor: pb.ModelInferRequest.InferInputTensor, name: str) -> list:
    expected = _CONTENTS_FIELD[tensor.datatype]
    for descriptor, _ in tensor.contents.ListFields():
        if descriptor.name != expected:
            raise _invalid(f"input '{name}' is {tensor.datatype} but its contents are in {descriptor.name}; "
                           f"expected {expected}")
    return list(getattr(tensor.contents, expected))


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(f"input '{name}' is not valid UTF-8: {e}") from None


def _read_sampling_json(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(_utf8(data, "sampling_parameters"))
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise _invalid(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise _invalid(f"input 'sampling_parameters' must be a JSON object, not {type(parsed).__name__}")
    return {key: _sampling_value(key, value, "sampling_parameters") for key, value in parsed.items()}


def _read_parameters(parameters) -> tuple[dict[str, Any], bool]:
    """Request parameters -> (sampling values, triton_enable_empty_final_response)."""
    sampling, empty_final = {}, False
    for key, param in parameters.items():
        choice = param.WhichOneof("parameter_choice")
        value = None if choice is None else getattr(param, choice)
        if key == EMPTY_FINAL_RESPONSE:
            if choice != "bool_param":
                raise _invalid(f"request parameter '{key}' must be a bool_param, not {choice}")
            empty_final = value
        elif key in _SAMPLING_TYPES:
            sampling[key] = _sampling_value(key, value, "request parameters")
        elif key.startswith("sequence_"):
            raise _invalid(f"request parameter '{key}': sequence batching is not supported")
        elif key not in _IGNORED_PARAMETERS:
            raise _invalid(f"unknown request parameter '{key}'; accepted: {', '.join(_SAMPLING_TYPES)}, "
                           f"{EMPTY_FINAL_RESPONSE}")
    return sampling, empty_final


def _sampling_value(key: str, value: Any, where: str) -> Any:
    """A sampling value as JSON or an InferParameter gives it -> its Python type. Numbers may come as strings
    ({"max_tokens": "100"}, as Triton's vLLM client examples send them); vLLM's top_k=-1 (off) is our 0."""
    kind = _SAMPLING_TYPES.get(key)
    if kind is None:
        raise _invalid(f"unknown sampling parameter '{key}' in {where}; accepted: {', '.join(_SAMPLING_TYPES)}")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    bad = _invalid(f"sampling parameter {key}={shown} in {where} is not {_KIND_NAMES[kind]}")
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is tuple:  # stop: one string or a list of them
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise bad
        return tuple(value)
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        raise bad
    try:
        number = _number(value, kind)
    except (ValueError, OverflowError):  # "hot", 2.5 for an integer, NaN, 1e999 as an integer
        raise bad from None
    return 0 if key == "top_k" and number == -1 else number


def _number(value: int | float | str, kind: type) -> int | float:
    if kind is float:
        number = float(value)
        if math.isnan(number):
            raise ValueError("NaN")
        return number
    if isinstance(value, str):
        return int(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


# --- responses -----------------------------------------------------------------------------------


def build_response(model_name: str, request_id: str, text: str, *, finish_reason: str | None = None,
                   num_input_tokens: int | None = None, num_output_tokens: int | None = None, final: bool,
                   outputs: tuple[str, ...] = ("text_output",)) -> pb.ModelInferResponse:
    """One response to a request: the `outputs` it asked for (LLMRequest.outputs), in raw_output_contents.

    `text` is the new text (streaming) or all of it; `finish_reason` "stop"/"length", None while unfinished
    (sent as "None", as Triton's vLLM backend does); `num_output_tokens` counts the tokens behind `text`.
    `final` marks the request's last response (parameter triton_final_response)."""
    values = {"text_output": text, "finish_reason": str(finish_reason),
              "num_input_tokens": num_input_tokens, "num_output_tokens": num_output_tokens}
    resp = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request_id)
    resp.parameters[FINAL_RESPONSE].bool_param = final
    for name in OUTPUT_DATATYPES:
        if name not in outputs:
            continue
        datatype, value = OUTPUT_DATATYPES[name], values[name]
        if value is None:
            raise ValueError(f"output {name} is wanted but its value is None")
        resp.outputs.add(name=name, datatype=datatype, shape=[1])
        resp.raw_output_contents.append(_length_prefixed(value.encode()) if datatype == "BYTES"
                                        else struct.pack("<I", value))
    return resp


def empty_final_response(model_name: str, request_id: str) -> pb.ModelInferResponse:
    """No outputs, only `triton_final_response` = true: ends a stream request whose last text went out
    already (sent only if the request asked for it, LLMRequest.empty_final_response)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request_id)
    resp.parameters[FINAL_RESPONSE].bool_param = True
    return resp


def stream_error(message: str, request_id: str, model_name: str = "") -> pb.ModelStreamInferResponse:
    """An error for one request of a stream; the stream itself goes on (Triton does the same)."""
    resp = pb.ModelStreamInferResponse(error_message=message)
    resp.infer_response.id = request_id
    resp.infer_response.model_name = model_name
    resp.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return resp


def _length_prefixed(element: bytes) -> bytes:
    """One raw BYTES element: its length as a little-endian uint32, then the bytes."""
    return struct.pack("<I", len(element)) + element


# --- health and metadata -------------------------------------------------------------------------


def server_live_response(live: bool) -> pb.ServerLiveResponse:
    return pb.ServerLiveResponse(live=live)


def server_ready_response(ready: bool) -> pb.ServerReadyResponse:
    return pb.ServerReadyResponse(ready=ready)


def model_ready_response(req: pb.ModelReadyRequest, model_name: str, ready: bool) -> pb.ModelReadyResponse:
    """Ready only for the served model (and version); another name is not an error, just not ready."""
    return pb.ModelReadyResponse(ready=ready and req.name == model_name and req.version in ("", MODEL_VERSION))


def server_metadata_response(version: str | None = None) -> pb.ServerMetadataResponse:
    """version: moeray's installed version unless given."""
    version = importlib.metadata.version("moeray") if version is None else version
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)


def model_metadata_response(req: pb.ModelMetadataRequest, model_name: str) -> pb.ModelMetadataResponse:
    """The served model's tensors; RequestError NOT_FOUND for another model."""
    _check_model(req.name, req.version, model_name)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model_name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[tensor(name=n, datatype=d, shape=[1]) for n, d in INPUT_DATATYPES.items()],
        outputs=[tensor(name=n, datatype=d, shape=[1] if n == "num_input_tokens" else [-1])
                 for n, d in OUTPUT_DATATYPES.items()])
