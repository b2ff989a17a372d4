"""The standard gRPC side services, one call each: `grpc.health.v1.Health` and server reflection.

Reflection answers from a private descriptor pool. The process-wide pool knows our KServe messages
only under `moeray.kserve.v2`, while we serve them as `inference.GRPCInferenceService`; so the
private pool holds a twin of kserve.proto whose package is `inference`, the names a client such as
grpcurl sees on the wire. (A private pool also keeps the twin clear of tritonclient's own
`inference.*` in the default pool.)

Behind Ray Serve's gRPC proxy (2.60), whatever a servicer function registers is routed to the ingress
deployment's method of the same name (health: `Check`, `Watch`), except services marked passthrough.
Serve's own reflection (`gRPCOptions.enable_reflection`, on by default) looks names up in the default
pool and cannot describe `inference.GRPCInferenceService`; turn it off and register this one from a
servicer function after `server.add_passthrough_service(REFLECTION_SERVICE_NAME)` (a Ray-internal API).
"""

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeray.cluster.kserve import kserve, kserve_pb2

HEALTH_SERVICE_NAME = health.SERVICE_NAME  # "grpc.health.v1.Health"
REFLECTION_SERVICE_NAME = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"


def add_health(server: grpc.Server, service_names: Iterable[str], serving: bool = True) -> health.HealthServicer:
    """Serve grpc.health.v1.Health on a (thread-pool) grpc.Server: the server as a whole ("") and each of
    `service_names` report SERVING (NOT_SERVING if not `serving`). Returns the servicer: `.set(name, status)`
    changes a status, `.enter_graceful_shutdown()` turns all to NOT_SERVING for good."""
    servicer = health.HealthServicer()
    for name in ("", *service_names):
        servicer.set(name, _status(serving))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def add_health_aio(server: grpc.aio.Server, service_names: Iterable[str],
                         serving: bool = True) -> health.aio.HealthServicer:
    """add_health for a grpc.aio.Server; its servicer's `set` and `enter_graceful_shutdown` are coroutines."""
    servicer = health.aio.HealthServicer()
    for name in ("", *service_names):
        await servicer.set(name, _status(serving))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def add_reflection(server: grpc.Server | grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1alpha) for `service_names` and itself. `inference.GRPCInferenceService` is described
    as it is on the wire (package `inference`); any other name must be a service in the default descriptor
    pool (imported generated code, e.g. grpc.health.v1.Health)."""
    names = [*dict.fromkeys(service_names)] + [REFLECTION_SERVICE_NAME]
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for name in names:
        if name == kserve.SERVICE_NAME:
            _add_proto(pool, kserve_wire_file(), added)
            continue
        try:
            file = descriptor_pool.Default().FindFileContainingSymbol(name)
        except KeyError:
            raise ValueError(f"service '{name}' is not in the default descriptor pool; import its generated "
                             "_pb2 module first") from None
        _add_file(pool, file, added)
    reflection.enable_server_reflection(names, server, pool=pool)


def kserve_wire_file() -> descriptor_pb2.FileDescriptorProto:
    """kserve.proto with package `inference` (as Triton names it): the service, messages and type references."""
    ours, theirs = f".{kserve_pb2.DESCRIPTOR.package}.", ".inference."
    file = descriptor_pb2.FileDescriptorProto()
    kserve_pb2.DESCRIPTOR.CopyToProto(file)
    file.package = "inference"

    def rename(messages):
        for message in messages:
            for f in message.field:
                if f.type_name.startswith(ours):
                    f.type_name = theirs + f.type_name[len(ours):]
            rename(message.nested_type)

    rename(file.message_type)
    for service in file.service:
        for method in service.method:
            method.input_type = theirs + method.input_type[len(ours):]
            method.output_type = theirs + method.output_type[len(ours):]
    return file


def _add_file(pool: descriptor_pool.DescriptorPool, file, added: set[str]) -> None:
    """Copy `file` (a FileDescriptor) and, first, what it imports into `pool`."""
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    _add_proto(pool, proto, added)


def _add_proto(pool: descriptor_pool.DescriptorPool, proto: descriptor_pb2.FileDescriptorProto,
               added: set[str]) -> None:
    if proto.name not in added:  # `added`: file names already in `pool`
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(proto.name)


def add_reflection_to_serve_proxy(servicer: object, server) -> None:
    """A `grpc_servicer_functions` entry for Ray Serve's gRPC proxy: reflection answered by the proxy
    itself. Serve's own reflection looks names up in the default descriptor pool, where
    `inference.GRPCInferenceService` is not (our messages live in package `moeray.kserve.v2`), so
    it is turned off (`enable_reflection=False`) and this registers ours as a *passthrough*
    service, which Serve leaves unrouted (`add_passthrough_service`, a Serve internal)."""
    server.add_passthrough_service(REFLECTION_SERVICE_NAME)
    add_reflection(server, [kserve.SERVICE_NAME, HEALTH_SERVICE_NAME])
