"""`moeray serve`: the whole server's lifecycle — Ray, router + expert groups, the Serve ingress.

    start(spec) -> Server      # Ray (local or `address`), the data plane, HTTP + gRPC proxies
    server.wait()              # until Ctrl-C / SIGTERM
    server.stop()              # ingress first (no new requests), then the data plane, then Ray

Ports come from the spec (Triton's conventions by default: HTTP 8000, gRPC 8001); nothing else
listens. A port already in use is reported by number before anything heavy starts.
"""

import os
import secrets
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import serve

from moeray.actors.client_load import ClientPolicy
from moeray.actors.engine import EngineConfig
from moeray.autoscaler.policy import Policy, load_policy
from moeray.cluster.admin_client import TOKEN_FILE  # where the CLI finds a local server's admin token
from moeray.cluster.deploy import ClusterConfig, Deployment, deploy, expert_bytes
from moeray.cluster.metrics import MoerayCollector, serve_metrics
from moeray.cluster.remote_errors import unwrap
from moeray.cluster.serving import ServingSpec
from moeray.cluster.telemetry import exporter_names, otel_env
from moeray.models import DEFAULT_MODEL_DIR, load_config

DEFAULT_MODEL_NAME = "moeray-default"  # what the built-in model is served as
APP_NAME = "moeray"
BUILT_IN_POLICY = "<built-in default policy>"  # its values are configs/policies/default.yaml's


@dataclass
class Server:
    spec: ServingSpec
    deployment: Deployment
    model_name: str
    owns_ray: bool
    admin_token: str
    token_source: str  # where the admin token came from, for the startup message
    controller: "ray.actor.ActorHandle | None" = None
    log: object = print
    metrics: object = None  # the /metrics HTTP server
    watching: threading.Event | None = None  # set to stop the deployment's recovery watch
    _stopping: threading.Event = field(default_factory=threading.Event)

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

    def run_scaler(self, interval_s: float = 0.5) -> None:
        """Carry out the autoscaler's resize requests (`moeray scale`, or the scaling policy) on a
        background thread: this process owns the deployment, so it starts and stops the groups."""
        def loop():
            while not self._stopping.wait(interval_s):
                try:
                    request = ray.get(self.controller.take_scale_request.remote(), timeout=30)
                except ray.exceptions.RayError:
                    continue
                if request is None:
                    continue
                target, reason = request
                self.log(f"resizing the expert pool to {target} groups ({reason})")
                error = None
                try:
                    self.deployment.scale_to(target, log=self.log)
                except Exception as err:  # reported to the autoscaler; serving goes on with the pool it has
                    error = f"{type(err).__name__}: {unwrap(err)}"
                    self.log(f"resizing to {target} groups failed: {error}")
                ray.get(self.controller.scale_done.remote(len(self.deployment.groups), error))

        threading.Thread(target=loop, name="scaler", daemon=True).start()

    def watch_policy(self, interval_s: float = 0.5) -> None:
        """Re-apply the policy file whenever its contents change, on a background thread, until `stop`."""
        watch = PolicyWatch(self.spec.policy)

        def loop():
            while not self._stopping.wait(interval_s):
                if (text := watch.changed()) is not None:
                    self.apply_policy(text, self.spec.policy)

        threading.Thread(target=loop, name="policy-watch", daemon=True).start()

    def apply_policy(self, text: str, source: str) -> bool:
        """Hand a policy to the autoscaler; a bad one is reported and the last good one stays."""
        try:
            ray.get(self.controller.apply_policy.remote(text, source))
            self.log(f"placement policy {source} applied")
            return True
        except ray.exceptions.RayTaskError as err:
            self.log(f"placement policy {source} rejected; the last good one stays:\n{unwrap(err)}")
            return False

    @property
    def metrics_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.metrics_port}/metrics"

    def stop(self) -> None:
        self._stopping.set()
        if self.watching is not None:
            self.watching.set()
        if self.metrics is not None:
            self.metrics.stop()
        try:
            if self.controller is not None:
                try:
                    ray.get(self.controller.stop.remote(), timeout=15)
                finally:
                    ray.kill(self.controller)
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
    from moeray.autoscaler.controller_actor import AutoscalerController
    from moeray.cluster.frontend import Frontend
    from moeray.cluster.kserve.ingress import SERVICER_FUNCTIONS

    model_path = Path(spec.model) if spec.model else DEFAULT_MODEL_DIR
    model_config, _ = load_config(model_path)  # a bad checkpoint fails here, before Ray starts
    exporter_names(), exporter_names(signal="METRICS")  # and a bad OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER
    policy_text, policy_source = (Path(spec.policy).read_text(), spec.policy) if spec.policy else ("", BUILT_IN_POLICY)
    policy = load_policy(spec.policy) if spec.policy else Policy()  # and a bad policy
    redundant_slots = policy.replication.redundant_slots_per_group if spec.redundant_slots is None else spec.redundant_slots
    for port in (spec.http_port, spec.grpc_port, spec.metrics_port):
        _check_port_free(spec.host, port)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        log(f"starting Ray ({'joining ' + spec.address if spec.address else 'local cluster'})")
        ray.init(address=spec.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    deployment = controller = None
    try:
        log(f"loading {model_path} into a router and {spec.expert_groups} expert groups")
        engine = EngineConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                              kv_cache_bytes=spec.kv_cache_bytes, max_model_len=spec.max_model_len)
        deployment = deploy(ClusterConfig(str(model_path), num_groups=spec.expert_groups,
                                          redundant_slots=redundant_slots, dtype=spec.dtype, engine=engine,
                                          max_queued_requests=spec.max_queued_requests,
                                          group_resources=dict(spec.group_resources),
                                          client_policy=ClientPolicy(spec.saturation_score, spec.saturation_min_pairs,
                                                                     spec.client_token_rate_limit)), log=log)
        controller = None
        if spec.autoscaler:
            log(f"starting the placement autoscaler (policy: {policy_source})")
            controller = AutoscalerController.options(num_cpus=0, runtime_env=_env()).remote(
                deployment.router, policy_text, policy_source, model_config.num_experts,
                expert_bytes(model_config, spec.dtype), deployment.group_nodes(), deployment.group_demand)
            try:
                ray.get(controller.apply_policy.remote(policy_text, policy_source))  # fits the deployed plan?
            except ray.exceptions.RayTaskError as err:
                raise unwrap(err) from None
        token, token_source = admin_token(spec)
        name = served_name(spec)
        log("starting the HTTP and gRPC front door")
        serve.start(http_options={"host": spec.host, "port": spec.http_port},
                    grpc_options={"port": spec.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS,
                                  "enable_reflection": False})
        ingress = Frontend.options(ray_actor_options={"num_cpus": 0, "runtime_env": _env()})
        serve.run(ingress.bind(deployment.router, str(model_path), name, controller, token, spec.max_request_bytes),
                  name=APP_NAME, route_prefix="/")
        collector = MoerayCollector(deployment.router, controller, name, spec.metrics_experts_per_layer,
                                    recoveries=lambda: deployment.recoveries)
        server = Server(spec, deployment, name, owns_ray, token, token_source, controller, log,
                        metrics=serve_metrics(collector, spec.host, spec.metrics_port))
        if controller is not None and spec.policy and spec.watch_policy:
            server.watch_policy()
        if controller is not None:
            server.run_scaler()
        server.watching = deployment.watch(log)  # recover from lost groups, heal the pool
        return server
    except BaseException:
        if controller is not None:
            ray.kill(controller)
        serve.shutdown()
        if deployment is not None:
            deployment.shutdown()
        if owns_ray:
            ray.shutdown()
        raise


def _env() -> dict:
    """What actors started here inherit from this process: the OTEL_* settings (telemetry.py)."""
    variables = otel_env()
    return {"env_vars": variables} if variables else {}


def admin_token(spec: ServingSpec) -> tuple[str, str]:
    """(token, where it came from): the spec's, else $MOERAY_ADMIN_TOKEN, else a fresh random one
    saved (mode 0600) where the CLI on this machine finds it."""
    if spec.admin_token:
        return spec.admin_token, "from the serving config"
    if os.environ.get("MOERAY_ADMIN_TOKEN"):
        return os.environ["MOERAY_ADMIN_TOKEN"], "from $MOERAY_ADMIN_TOKEN"
    token = secrets.token_urlsafe(24)
    TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    TOKEN_FILE.touch(mode=0o600)
    TOKEN_FILE.write_text(token + "\n")
    return token, f"in {TOKEN_FILE}"


class PolicyWatch:
    """Notices when the policy file's contents change (by mtime, then by text)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.mtime = self._mtime()
        self.text = self.path.read_text() if self.mtime else None

    def changed(self) -> str | None:
        mtime = self._mtime()
        if mtime is None or mtime == self.mtime:
            return None
        self.mtime = mtime
        text = self.path.read_text()
        if text == self.text:
            return None
        self.text = text
        return text

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ValueError(f"port {port} on {host} is already in use (choose another with --http-port/--grpc-port/--metrics-port)") from None
