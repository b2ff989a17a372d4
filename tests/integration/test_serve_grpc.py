"""`moeray serve`'s KServe v2 / Triton gRPC API, driven by the unmodified `tritonclient` and a plain
grpc health check, on a real local Ray cluster (loopback, free ports)."""

import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from moeray.models import DEFAULT_MODEL_DIR, load_model
from moeray.models.tokenizer import Tokenizer
from test_serve_http import free_port

MODEL = DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def server(ray_cluster):
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()), log=lambda m: None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def local():
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)
    return lambda prompt, n: engine.generate([tokenizer.encode(prompt)], SamplingParams(max_tokens=n))[0].text


def inputs(text, stream=False, sampling=None, datatype="BYTES"):
    text_input = triton.InferInput("text_input", [1], datatype)
    if datatype == "BYTES":
        text_input.set_data_from_numpy(np.array([text if isinstance(text, bytes) else text.encode()], dtype=np.object_))
    else:
        text_input.set_data_from_numpy(np.array([1], dtype=np.int32))
    flag = triton.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    params = triton.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling or {}).encode()], dtype=np.object_))
    return [text_input, flag, params]


def test_health_liveness_readiness_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata().name == "moeray"
    metadata = client.get_model_metadata(MODEL)
    assert metadata.name == MODEL and "text_input" in [i.name for i in metadata.inputs]
    with grpc.insecure_channel(server.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_unary_infer_equals_the_local_engine(client, local):
    result = client.infer(MODEL, inputs("The for statement", sampling={"max_tokens": 16, "temperature": 0}))
    assert result.as_numpy("text_output")[0].decode() == "The for statement" + local("The for statement", 16)
    assert result.get_response().parameters["triton_final_response"].bool_param


def test_streaming_gives_the_same_text_and_a_final_response(client, local):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i, prompt in enumerate(("The for statement", "def fibonacci(n):")):
            flags = inputs(prompt, True, {"max_tokens": 12, "temperature": 0, "ignore_eos": True})
            count = triton.InferInput("return_num_output_tokens", [1], "BOOL")
            count.set_data_from_numpy(np.array([True]))
            client.async_stream_infer(MODEL, flags + [count], request_id=f"r{i}")
        texts, tokens, done = {"r0": "", "r1": ""}, {"r0": 0, "r1": 0}, set()
        while len(done) < 2:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            texts[response.id] += result.as_numpy("text_output")[0].decode()
            tokens[response.id] += int(result.as_numpy("num_output_tokens")[0])
            if response.parameters["triton_final_response"].bool_param:
                done.add(response.id)
    finally:
        client.stop_stream()
    assert texts == {"r0": local("The for statement", 12), "r1": local("def fibonacci(n):", 12)}
    assert tokens == {"r0": 12, "r1": 12}, "every token is counted once, held-back ones included"


@pytest.mark.parametrize("kwargs, code, fragment", [
    ({"model": "gpt-4"}, "NOT_FOUND", "gpt-4"),
    ({"datatype": "INT32"}, "INVALID_ARGUMENT", "text_input"),
    ({"text": b"\xff\xfe"}, "INVALID_ARGUMENT", "UTF-8"),
    ({"sampling": {"max_tokens": 0}}, "INVALID_ARGUMENT", "max_tokens"),
    ({"sampling": {"temperature": -2}}, "INVALID_ARGUMENT", "temperature"),
    ({"text": "x " * 3000}, "INVALID_ARGUMENT", "max_model_len"),
    ({"text": "x" * (5 << 20)}, "RESOURCE_EXHAUSTED", "at most 4194304 (max_request_bytes)"),
])
def test_bad_requests_get_a_status_that_names_the_problem(client, kwargs, code, fragment):
    model = kwargs.pop("model", MODEL)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs(kwargs.pop("text", "The"), **kwargs))
    assert err.value.status() == f"StatusCode.{code}" and fragment in err.value.message()
    assert client.infer(MODEL, inputs("The", sampling={"max_tokens": 2})).as_numpy("text_output")[0]


def test_a_bad_request_in_a_stream_is_answered_in_band_and_the_stream_goes_on(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs("The", True, {"max_tokens": -1}), request_id="bad")
        client.async_stream_infer(MODEL, inputs("The", True, {"max_tokens": 3}), request_id="good")
        errors, finished = [], False
        while not finished:
            result, error = responses.get(timeout=60)
            if error is not None:
                errors.append(str(error))
                continue
            finished = result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "max_tokens" in errors[0]


def test_other_triton_rpcs_are_unimplemented(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_repository_index()
    assert "UNIMPLEMENTED" in err.value.status()


def test_server_reflection_lists_the_standard_service_names(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        infer = database.FindFileContainingSymbol("inference.GRPCInferenceService")
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    assert infer.package == "inference" and "ModelStreamInfer" in [m.name for m in infer.service[0].method]
