"""The KServe v2 / Triton gRPC protocol layer against the real tritonclient: wire compatibility of our
messages, request parsing, responses, and a loopback gRPC server driven by tritonclient.

The servers here run a fake servicer (it echoes the prompt's words in upper case); this is a protocol
test; the real ingress belongs in tests/integration.
"""

import asyncio
import json
import queue
import struct
import subprocess
import sys
from concurrent import futures
from unittest import mock

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request  # what InferenceServerClient.infer sends
from tritonclient.utils import InferenceServerException

from moeray.cluster.kserve import codegen, kserve, services
from moeray.cluster.kserve import kserve_pb2 as pb

MODEL = "moe"


# --- wire compatibility --------------------------------------------------------------------------


def _fields(file, message_name: str) -> dict[str, tuple]:
    """name -> (number, type, label, message type without the package, oneof index, map entry?) of every field
    of `message_name` in `file` (a FileDescriptor), its nested messages' fields included."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    package = f".{proto.package}."

    def walk(message, prefix: str) -> dict[str, tuple]:
        out = {prefix + f.name: (f.number, f.type, f.label, f.type_name.removeprefix(package),
                                 f.oneof_index if f.HasField("oneof_index") else None, message.options.map_entry)
               for f in message.field}
        for nested in message.nested_type:
            out |= walk(nested, f"{prefix}{nested.name}.")
        return out

    (message,) = [m for m in proto.message_type if m.name == message_name]
    return walk(message, "")


@pytest.mark.parametrize("name", sorted(pb.DESCRIPTOR.message_types_by_name))
def test_every_field_has_tritons_number_type_and_label(name):
    ours, theirs = _fields(pb.DESCRIPTOR, name), _fields(triton_pb.DESCRIPTOR, name)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}  # name -> number
    assert ours == theirs


def test_infer_parameter_has_all_five_value_types():
    oneof = pb.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"]
    assert [f.name for f in oneof.fields] == ["bool_param", "int64_param", "string_param", "double_param",
                                              "uint64_param"]


def test_methods_are_tritons_with_the_same_messages_and_streaming():
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert theirs.full_name == kserve.SERVICE_NAME
    for method in kserve.METHODS:
        t = theirs.methods_by_name[method.name]
        assert (t.input_type.name, t.output_type.name) == (method.request.DESCRIPTOR.name,
                                                           method.response.DESCRIPTOR.name)
        assert (t.client_streaming, t.server_streaming) == ((method.kind is kserve.MethodKind.BIDI,) * 2)
    assert {m.name: m.kind.value for m in kserve.METHODS} == {
        "ServerLive": "unary", "ServerReady": "unary", "ModelReady": "unary", "ServerMetadata": "unary",
        "ModelMetadata": "unary", "ModelInfer": "unary", "ModelStreamInfer": "bidi"}


def test_registers_like_generated_code_so_ray_serve_can_take_it():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    kserve.add_servicer_to_server(mock.Mock(), server)  # Serve's proxy passes a stand-in servicer
    server.stop(grace=None)


def test_our_symbols_do_not_collide_with_tritonclients():
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "moeray.kserve.v2.ModelInferRequest"
    assert triton_pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert pb.DESCRIPTOR.name == "moeray/cluster/kserve/kserve.proto"
    for first, second in [("tritonclient.grpc", "moeray.cluster.kserve.kserve"),
                          ("moeray.cluster.kserve.services", "tritonclient.grpc")]:  # either import order
        code = f"import {first}, {second}; print('ok')"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_committed_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools compiles the .proto")
    compiled = descriptor_pb2.FileDescriptorSet.FromString(codegen.compile_proto(tmp_path, descriptor_set=True)
                                                           .read_bytes()).file[0]
    for message in compiled.message_type:  # protoc adds json_name; generated Python code leaves it out
        _clear_json_names(message)
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "kserve.proto changed: run python -m moeray.cluster.kserve.codegen"
    assert codegen.gencode_version(codegen.GENERATED.read_text()) <= codegen.MAX_GENCODE


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for f in message.field:
        f.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


# --- requests ------------------------------------------------------------------------------------


def _triton_inputs(prompt="The capital of France is", *, stream=None, sampling=None, exclude=None,
                   flags=()) -> list:
    """Inputs as Triton's vLLM client examples build them."""
    inputs = [triton.InferInput("text_input", [1], "BYTES")]
    inputs[-1].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    if stream is not None:
        inputs.append(triton.InferInput("stream", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([stream], dtype=bool))
    if sampling is not None:
        inputs.append(triton.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([json.dumps(sampling).encode("utf-8")], dtype=np.object_))
    if exclude is not None:
        inputs.append(triton.InferInput("exclude_input_in_output", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([exclude], dtype=bool))
    for flag in flags:
        inputs.append(triton.InferInput(flag, [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([True], dtype=bool))
    return inputs


def _triton_request(inputs, *, model=MODEL, request_id="", outputs=None, parameters=None, priority=0,
                    timeout=None) -> triton_pb.ModelInferRequest:
    return _get_inference_request(model_name=model, inputs=inputs, model_version="", request_id=request_id,
                                  outputs=outputs, sequence_id=0, sequence_start=False, sequence_end=False,
                                  priority=priority, timeout=timeout, parameters=parameters)


def _ours(triton_request) -> pb.ModelInferRequest:
    """Through the wire: tritonclient's bytes, parsed by our message class."""
    return pb.ModelInferRequest.FromString(triton_request.SerializeToString())


def test_parses_a_triton_vllm_client_request():
    sampling = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "100"}  # strings, as their sample sends
    req = _triton_request(_triton_inputs(stream=False, sampling=sampling, exclude=True), request_id="7",
                          outputs=[triton.InferRequestedOutput("text_output")], parameters=sampling)
    assert kserve.parse_infer_request(_ours(req), MODEL) == kserve.LLMRequest(
        request_id="7", text="The capital of France is", stream=False,
        sampling={"temperature": 0.1, "top_p": 0.95, "max_tokens": 100}, exclude_input_in_output=True,
        outputs=("text_output",))


def test_parses_a_streaming_request_with_extra_outputs():
    sampling = {"max_tokens": 8, "temperature": 0.7, "top_k": -1, "seed": 3, "stop": ["\n", "."],
                "ignore_eos": True}
    req = _triton_request(_triton_inputs("héllo ✓", stream=True, sampling=sampling,
                                         flags=("return_finish_reason", "return_num_output_tokens")))
    req.parameters[kserve.EMPTY_FINAL_RESPONSE].bool_param = True  # what async_stream_infer adds on request
    parsed = kserve.parse_infer_request(_ours(req), MODEL, streaming_rpc=True)
    assert parsed.text == "héllo ✓" and parsed.stream and parsed.exclude_input_in_output
    assert parsed.sampling == {"max_tokens": 8, "temperature": 0.7, "top_k": 0, "seed": 3, "stop": ("\n", "."),
                               "ignore_eos": True}
    assert parsed.outputs == ("text_output", "finish_reason", "num_output_tokens")
    assert parsed.empty_final_response


def test_defaults_follow_tritons_vllm_backend():
    parsed = kserve.parse_infer_request(_ours(_triton_request(_triton_inputs())), MODEL)
    assert (parsed.stream, parsed.exclude_input_in_output, parsed.sampling, parsed.outputs) == (
        False, False, {}, ("text_output",))  # not streaming: the prompt is part of text_output


def test_requested_outputs_are_the_ones_returned():
    req = _triton_request(_triton_inputs(flags=("return_num_input_tokens",)),
                          outputs=[triton.InferRequestedOutput("finish_reason")])
    assert kserve.parse_infer_request(_ours(req), MODEL).outputs == ("finish_reason",)


def test_bytes_inputs_raw_and_typed_give_the_same_request():
    raw = _ours(_triton_request(_triton_inputs("say ✓", sampling={"max_tokens": 4}, stream=False)))
    typed = pb.ModelInferRequest(model_name=MODEL)
    for tensor, data in zip(raw.inputs, raw.raw_input_contents):
        new = typed.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[1, 1])
        if tensor.datatype == "BYTES":
            new.contents.bytes_contents.append(data[4:])  # typed BYTES elements carry no length prefix
        else:
            new.contents.bool_contents.append(data != b"\x00")
    assert kserve.parse_infer_request(typed, MODEL) == kserve.parse_infer_request(raw, MODEL)
    assert kserve.parse_infer_request(typed, MODEL).text == "say ✓"


def test_request_parameters_of_all_five_types():
    req = _ours(_triton_request(_triton_inputs(), priority=3, timeout=1000))  # priority, timeout: ignored
    req.parameters["max_tokens"].int64_param = 5
    req.parameters["temperature"].double_param = 0.5
    req.parameters["top_p"].string_param = "0.9"
    req.parameters["ignore_eos"].bool_param = True
    req.parameters["seed"].uint64_param = 2**63 + 1
    assert kserve.parse_infer_request(req, MODEL).sampling == {
        "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "ignore_eos": True, "seed": 2**63 + 1}


def test_the_sampling_parameters_tensor_wins_over_request_parameters():
    req = _ours(_triton_request(_triton_inputs(sampling={"max_tokens": 9}), parameters={"max_tokens": 2,
                                                                                         "top_k": 4}))
    assert kserve.parse_infer_request(req, MODEL).sampling == {"max_tokens": 9, "top_k": 4}


def _base() -> pb.ModelInferRequest:
    return _ours(_triton_request(_triton_inputs(stream=False)))


def _set_sampling(req, text: bytes) -> pb.ModelInferRequest:
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
    return req


def _replace_text(req, raw: bytes, datatype="BYTES", shape=(1,)) -> pb.ModelInferRequest:
    req.inputs[0].datatype = datatype
    req.inputs[0].ClearField("shape")
    req.inputs[0].shape.extend(shape)
    req.raw_input_contents[0] = raw
    return req


def _drop_text(req):
    del req.inputs[0]
    del req.raw_input_contents[0]
    return req


def _typed_and_raw(req):
    req.inputs[0].contents.bytes_contents.append(b"hi")
    return req


def _typed_in_wrong_field(req):
    del req.raw_input_contents[:]
    req.inputs[0].contents.int_contents.append(3)
    req.inputs[1].contents.bool_contents.append(False)
    return req


def _add_input(name, datatype="BOOL", raw=b"\x01"):
    def add(req):
        req.inputs.add(name=name, datatype=datatype, shape=[1])
        req.raw_input_contents.append(raw)
        return req
    return add


def _set_field(attr, value):
    def set_(req):
        setattr(req, attr, value)
        return req
    return set_


def _param(key, kind, value):
    def set_(req):
        setattr(req.parameters[key], kind, value)
        return req
    return set_


def _stream_true(req):
    req.raw_input_contents[1] = b"\x01"
    return req


def _stream_with_exclude_false(req):
    return _add_input("exclude_input_in_output", raw=b"\x00")(_stream_true(req))


def _request_output(name):
    def add(req):
        req.outputs.add(name=name)
        return req
    return add


def _shared_memory(req):
    req.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return req


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = {
    "missing text_input": (_drop_text, INVALID, "input 'text_input' is missing"),
    "text_input as INT32": (lambda r: _replace_text(r, struct.pack("<i", 5), "INT32"), INVALID,
                            "input 'text_input' has datatype INT32; expected BYTES"),
    "two prompts": (lambda r: _replace_text(r, b"\x01\x00\x00\x00a\x01\x00\x00\x00b", shape=(2,)), INVALID,
                    "input 'text_input' has shape [2]; expected [1] or [1, 1]"),
    "shape [1] with two elements": (lambda r: _replace_text(r, b"\x01\x00\x00\x00a\x01\x00\x00\x00b"), INVALID,
                                    "input 'text_input' has 2 elements; expected 1"),
    "no data": (lambda r: _replace_text(r, b""), INVALID, "input 'text_input' has 0 elements"),
    "not UTF-8": (lambda r: _replace_text(r, b"\x02\x00\x00\x00\xff\xfe"), INVALID,
                  "input 'text_input' is not valid UTF-8"),
    "truncated length prefix": (lambda r: _replace_text(r, b"\x05\x00"), INVALID, "4-byte length prefix"),
    "truncated element": (lambda r: _replace_text(r, b"\x09\x00\x00\x00abc"), INVALID,
                          "element 0 declares 9 bytes but 3 remain"),
    "malformed JSON": (lambda r: _set_sampling(r, b'{"max_tokens": 5'), INVALID,
                       "input 'sampling_parameters' is not valid JSON"),
    "JSON integer of 5000 digits": (lambda r: _set_sampling(r, b'{"seed": ' + b"9" * 5000 + b"}"), INVALID,
                                    "input 'sampling_parameters' is not valid JSON: Exceeds the limit"),
    "JSON list": (lambda r: _set_sampling(r, b"[5]"), INVALID, "must be a JSON object, not list"),
    "max_tokens 0": (lambda r: _set_sampling(r, b'{"max_tokens": 0}'), INVALID,
                     "sampling parameter max_tokens=0 must be an integer >= 1"),
    "max_tokens 2.5": (lambda r: _set_sampling(r, b'{"max_tokens": 2.5}'), INVALID,
                       "max_tokens=2.5 in sampling_parameters is not an integer"),
    "temperature < 0": (lambda r: _set_sampling(r, b'{"temperature": -0.5}'), INVALID,
                        "sampling parameter temperature=-0.5 must be >= 0"),
    "temperature word": (lambda r: _set_sampling(r, b'{"temperature": "hot"}'), INVALID,
                         "temperature='hot' in sampling_parameters is not a number"),
    "temperature NaN": (lambda r: _set_sampling(r, b'{"temperature": NaN}'), INVALID,
                        "temperature=nan in sampling_parameters is not a number"),
    "seed too large": (lambda r: _set_sampling(r, b'{"seed": 18446744073709551616}'), INVALID,
                       "seed=18446744073709551616 must be None or an integer in [0, 2**64)"),
    "top_p 0": (lambda r: _set_sampling(r, b'{"top_p": 0}'), INVALID, "top_p=0.0 must be in (0, 1]"),
    "top_p 1.5": (lambda r: _set_sampling(r, b'{"top_p": 1.5}'), INVALID, "top_p=1.5 must be in (0, 1]"),
    "top_k -2": (lambda r: _set_sampling(r, b'{"top_k": -2}'), INVALID, "top_k=-2 must be an integer >= 0"),
    "stop not strings": (lambda r: _set_sampling(r, b'{"stop": [1]}'), INVALID,
                         "stop=[1] in sampling_parameters is not a string or a list of strings"),
    "unknown sampling key": (lambda r: _set_sampling(r, b'{"n": 2}'), INVALID,
                             "unknown sampling parameter 'n' in sampling_parameters"),
    "raw and typed contents": (_typed_and_raw, INVALID,
                               "input 'text_input' has contents, but the request uses raw_input_contents"),
    "raw count": (lambda r: r.raw_input_contents.append(b"") or r, INVALID,
                  "2 inputs but 3 raw_input_contents"),
    "typed in the wrong field": (_typed_in_wrong_field, INVALID,
                                 "input 'text_input' is BYTES but its contents are in int_contents"),
    "unknown input": (_add_input("image", "BYTES"), INVALID, "unknown input 'image'"),
    "input twice": (_add_input("stream"), INVALID, "input 'stream' is given twice"),
    "shared memory": (_shared_memory, INVALID, "input 'text_input' is in shared memory"),
    "unknown model": (_set_field("model_name", "gpt"), grpc.StatusCode.NOT_FOUND,
                      "unknown model 'gpt'; this server serves 'moe'"),
    "unknown version": (_set_field("model_version", "2"), grpc.StatusCode.NOT_FOUND,
                        "model 'moe' has no version '2'"),
    "stream on ModelInfer": (_stream_true, INVALID, "stream=true needs the ModelStreamInfer RPC"),
    "unknown request parameter": (_param("lora_name", "string_param", "x"), INVALID,
                                  "unknown request parameter 'lora_name'"),
    "sequence_id": (_param("sequence_id", "int64_param", 4), INVALID, "sequence batching is not supported"),
    "request parameter type": (_param("max_tokens", "bool_param", True), INVALID,
                               "max_tokens=True in request parameters is not an integer"),
    "empty final response as int": (_param(kserve.EMPTY_FINAL_RESPONSE, "int64_param", 1), INVALID,
                                     "'triton_enable_empty_final_response' must be a bool_param"),
    "unknown output": (_request_output("logprobs"), INVALID, "unknown output 'logprobs' requested"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_refused_with_a_message_naming_the_problem(case):
    mutate, code, message = BAD_REQUESTS[case]
    with pytest.raises(kserve.RequestError) as error:
        kserve.parse_infer_request(mutate(_base()), MODEL)
    assert error.value.code == code
    assert message in error.value.message


def test_exclude_input_in_output_false_is_refused_when_streaming():
    with pytest.raises(kserve.RequestError, match="exclude_input_in_output=false is not allowed when streaming"):
        kserve.parse_infer_request(_stream_with_exclude_false(_base()), MODEL, streaming_rpc=True)


# --- responses -----------------------------------------------------------------------------------


def _as_triton(response: pb.ModelInferResponse) -> triton.InferResult:
    return triton.InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))


def test_tritonclient_reads_our_response():
    response = kserve.build_response(MODEL, "r1", "Paris ✓", finish_reason="stop", num_input_tokens=6,
                                     num_output_tokens=2, final=True, outputs=tuple(kserve.OUTPUT_DATATYPES))
    result = _as_triton(response)
    assert result.as_numpy("text_output").tolist() == ["Paris ✓".encode()]
    assert result.as_numpy("finish_reason").tolist() == [b"stop"]
    assert result.as_numpy("num_input_tokens").dtype == np.uint32
    assert (result.as_numpy("num_input_tokens").tolist(), result.as_numpy("num_output_tokens").tolist()) == (
        [6], [2])
    got = result.get_response()
    assert (got.id, got.model_name, got.parameters[kserve.FINAL_RESPONSE].bool_param) == ("r1", MODEL, True)


def test_only_the_wanted_outputs_and_non_final_flag():
    result = _as_triton(kserve.build_response(MODEL, "r1", " Par", final=False))
    assert [o.name for o in result.get_response().outputs] == ["text_output"]
    assert result.as_numpy("finish_reason") is None
    assert result.get_response().parameters[kserve.FINAL_RESPONSE].bool_param is False
    unfinished = _as_triton(kserve.build_response(MODEL, "r1", "", final=False,
                                                  outputs=("text_output", "finish_reason")))
    assert unfinished.as_numpy("finish_reason").tolist() == [b"None"]  # Triton's vLLM backend says so too


def test_stream_error_and_empty_final_response():
    error = triton_pb.ModelStreamInferResponse.FromString(kserve.stream_error("no such thing", "r9").SerializeToString())
    assert (error.error_message, error.infer_response.id) == ("no such thing", "r9")
    empty = _as_triton(kserve.empty_final_response(MODEL, "r9")).get_response()
    assert (list(empty.outputs), empty.parameters[kserve.FINAL_RESPONSE].bool_param) == ([], True)


# --- loopback server driven by tritonclient ------------------------------------------------------


def _echo(req: kserve.LLMRequest) -> list[str]:
    """The fake model: the prompt's words in upper case, one per token, up to max_tokens."""
    return [" " + word.upper() for word in req.text.split()][: req.sampling.get("max_tokens", 16)]


def _completion(req: kserve.LLMRequest) -> str:
    """All of the fake model's text, the prompt first unless excluded (as a non-streamed response has it)."""
    text = "".join(_echo(req))
    return text if req.exclude_input_in_output else req.text + text


def _response(req: kserve.LLMRequest, text: str, num_tokens: int, final: bool) -> pb.ModelInferResponse:
    return kserve.build_response(MODEL, req.request_id, text, finish_reason="length" if final else None,
                                 num_input_tokens=len(req.text.split()), num_output_tokens=num_tokens, final=final,
                                 outputs=req.outputs)


def _stream_responses(request: pb.ModelInferRequest):
    try:
        req = kserve.parse_infer_request(request, MODEL, streaming_rpc=True)
    except kserve.RequestError as e:
        yield kserve.stream_error(e.message, request.id, request.model_name)
        return
    pieces = _echo(req) if req.stream else [_completion(req)]
    for i, piece in enumerate(pieces):
        response = _response(req, piece, len(_echo(req)) if not req.stream else 1, final=i == len(pieces) - 1)
        yield pb.ModelStreamInferResponse(infer_response=response)


class FakeServicer:
    def ServerLive(self, request, context):
        return kserve.server_live_response(True)

    def ServerReady(self, request, context):
        return kserve.server_ready_response(True)

    def ModelReady(self, request, context):
        return kserve.model_ready_response(request, MODEL, ready=True)

    def ServerMetadata(self, request, context):
        return kserve.server_metadata_response("0.1.0")

    def ModelMetadata(self, request, context):
        try:
            return kserve.model_metadata_response(request, MODEL)
        except kserve.RequestError as e:
            context.abort(e.code, e.message)

    def ModelInfer(self, request, context):
        try:
            req = kserve.parse_infer_request(request, MODEL)
        except kserve.RequestError as e:
            context.abort(e.code, e.message)
        return _response(req, _completion(req), len(_echo(req)), final=True)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            yield from _stream_responses(request)


@pytest.fixture(scope="module")
def server_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    kserve.add_servicer_to_server(FakeServicer(), server)
    services.add_health(server, [kserve.SERVICE_NAME])
    services.add_reflection(server, [kserve.SERVICE_NAME, services.HEALTH_SERVICE_NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(server_address):
    with triton.InferenceServerClient(server_address) as client:
        yield client


def test_tritonclient_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("gpt")
    server = client.get_server_metadata(as_json=True)
    assert (server["name"], server["extensions"]) == ("moeray", ["parameters"])
    model = client.get_model_metadata(MODEL, as_json=True)
    assert (model["platform"], model["versions"]) == ("moeray", ["1"])
    assert {t["name"]: t["datatype"] for t in model["inputs"]} == kserve.INPUT_DATATYPES
    assert {t["name"]: t["datatype"] for t in model["outputs"]} == kserve.OUTPUT_DATATYPES
    with pytest.raises(InferenceServerException, match="unknown model 'gpt'") as error:
        client.get_model_metadata("gpt")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_tritonclient_infer(client):
    result = client.infer(MODEL, _triton_inputs("the cat sat", sampling={"max_tokens": 2},
                                                flags=("return_num_output_tokens",)), request_id="a")
    assert result.as_numpy("text_output").tolist() == [b"the cat sat THE CAT"]
    assert result.as_numpy("num_output_tokens").tolist() == [2]
    assert result.get_response().id == "a"
    with pytest.raises(InferenceServerException, match="top_p=1.5 must be in") as error:
        client.infer(MODEL, _triton_inputs(sampling={"top_p": 1.5}))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_tritonclient_stream(client):
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, _triton_inputs("a b c", stream=True, flags=("return_finish_reason",)),
                                  request_id="s1", enable_empty_final_response=True)
        got = [responses.get(timeout=10) for _ in range(3)]
        assert [e for _, e in got] == [None] * 3
        assert [r.as_numpy("text_output")[0] for r, _ in got] == [b" A", b" B", b" C"]
        assert [r.as_numpy("finish_reason")[0] for r, _ in got] == [b"None", b"None", b"length"]
        assert [r.get_response().parameters[kserve.FINAL_RESPONSE].bool_param for r, _ in got] == [
            False, False, True]
        assert {r.get_response().id for r, _ in got} == {"s1"}

        bad = triton.InferInput("text_input", [1], "INT32")  # refused in-band; the stream goes on
        bad.set_data_from_numpy(np.array([3], dtype=np.int32))
        client.async_stream_infer(MODEL, [bad], request_id="s2")
        result, error = responses.get(timeout=10)
        assert result is None and "input 'text_input' has datatype INT32; expected BYTES" in str(error)

        client.async_stream_infer(MODEL, _triton_inputs("x y", stream=False), request_id="s3")
        result, error = responses.get(timeout=10)
        assert error is None and result.as_numpy("text_output").tolist() == [b"x y X Y"]
    finally:
        client.stop_stream()


def test_other_triton_rpcs_are_unimplemented(client):
    with pytest.raises(InferenceServerException) as error:
        client.get_model_repository_index()
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as error:
        client.get_model_config(MODEL)
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"


def test_grpc_health_check(server_address):
    with grpc.insecure_channel(server_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", kserve.SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service_as_it_is_on_the_wire(server_address):
    with grpc.insecure_channel(server_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {kserve.SERVICE_NAME, services.HEALTH_SERVICE_NAME,
                                                services.REFLECTION_SERVICE_NAME}
        file = database.FindFileContainingSymbol(kserve.SERVICE_NAME)
        assert file.package == "inference"
        (service,) = file.service
        assert [(m.name, m.input_type) for m in service.method][-2:] == [
            ("ModelInfer", ".inference.ModelInferRequest"), ("ModelStreamInfer", ".inference.ModelInferRequest")]
        assert database.FindFileContainingSymbol(services.HEALTH_SERVICE_NAME).package == "grpc.health.v1"


class AsyncFakeServicer:
    """FakeServicer's answers from coroutines, for a grpc.aio server."""

    def __getattr__(self, name):
        unary = getattr(FakeServicer(), name)

        async def call(request, context):
            return unary(request, context)
        return call

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            for response in _stream_responses(request):
                yield response


def test_aio_server_with_the_aio_tritonclient():
    servicer = AsyncFakeServicer()

    async def main():
        server = grpc.aio.server()
        kserve.add_servicer_to_server(servicer, server)
        await services.add_health_aio(server, [kserve.SERVICE_NAME])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with triton_aio.InferenceServerClient(f"127.0.0.1:{port}") as client:
                assert await client.is_server_live()
                result = await client.infer(MODEL, _triton_inputs("one two", exclude=True))
                assert result.as_numpy("text_output").tolist() == [b" ONE TWO"]

                async def requests():
                    yield {"model_name": MODEL, "inputs": _triton_inputs("p q", stream=True), "request_id": "x"}
                texts = []
                async for result, error in client.stream_infer(requests()):
                    assert error is None
                    texts.append(result.as_numpy("text_output")[0])
                    if result.get_response().parameters[kserve.FINAL_RESPONSE].bool_param:
                        break
                assert texts == [b" P", b" Q"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
                assert response.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(grace=None)

    asyncio.run(main())
