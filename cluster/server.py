"""`moeray serve`: the whole server's lifecycle — Ray, router + expert groups, the Serve ingress.

    start(spec) -> Server      # Ray (local or `address`), the data plane, HTTP + gRPC proxies
    server.wait()              # until Ctrl-C / SIGTERM
    server.stop()              # ingress first (no new requests), then the data plane, then Ray

Ports come from the spec (Triton's conventions by default: HTTP 8000, gRPC 8001); nothing else
listens. A port already in use is reported by number before anything heavy starts.
"""

import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from moeray.actors.engine import EngineConfig
from moeray.cluster.deploy import ClusterConfig, Deployment, deploy
from moeray.cluster.serving import ServingSpec
from moeray.models import DEFAULT_MODEL_DIR, load_config

DEFAULT_MODEL_NAME = "moeray-default"  # what the built-in model is served as
APP_NAME = "moeray"


@dataclass
class Server:
    spec: ServingSpec
    deployment: Deployment
    model_name: str
    owns_ray: bool

    @property
    def http_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.spec.host}:{self.spec.grpc_port}"

    def wait(self) -> None:
        """Block until SIGINT or SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            stop.wait(0.5)

    def stop(self) -> None:
        try:
            serve.shutdown()
        finally:
            try:
                self.deployment.shutdown()
            finally:
                if self.owns_ray:
                    ray.shutdown()


def served_name(spec: ServingSpec) -> str:
    if spec.served_model_name:
        return spec.served_model_name
    return Path(spec.model).resolve().name if spec.model else DEFAULT_MODEL_NAME


def start(spec: ServingSpec, log=lambda message: print(message, file=sys.stderr, flush=True)) -> Server:
    """Bring the whole server up; on any failure, take down what was started and raise."""
    from moeray.cluster.frontend import Frontend
    from moeray.cluster.kserve.ingress import SERVICER_FUNCTIONS

    model_path = Path(spec.model) if spec.model else DEFAULT_MODEL_DIR
    load_config(model_path)  # a bad checkpoint fails here, before Ray starts
    for port in (spec.http_port, spec.grpc_port):
        _check_port_free(spec.host, port)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        log(f"starting Ray ({'joining ' + spec.address if spec.address else 'local cluster'})")
        ray.init(address=spec.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    deployment = None
    try:
        log(f"loading {model_path} into a router and {spec.expert_groups} expert groups")
        engine = EngineConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                              kv_cache_bytes=spec.kv_cache_bytes, max_model_len=spec.max_model_len)
        deployment = deploy(ClusterConfig(str(model_path), num_groups=spec.expert_groups,
                                          redundant_slots=spec.redundant_slots, dtype=spec.dtype, engine=engine,
                                          max_queued_requests=spec.max_queued_requests))
        name = served_name(spec)
        log("starting the HTTP and gRPC front door")
        serve.start(http_options={"host": spec.host, "port": spec.http_port},
                    grpc_options={"port": spec.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS,
                                  "enable_reflection": False})
        serve.run(Frontend.bind(deployment.router, str(model_path), name), name=APP_NAME, route_prefix="/")
        return Server(spec, deployment, name, owns_ray)
    except BaseException:
        serve.shutdown()
        if deployment is not None:
            deployment.shutdown()
        if owns_ray:
            ray.shutdown()
        raise


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ValueError(f"port {port} on {host} is already in use (choose another with --http-port/--grpc-port)") from None
