"""gRPC server reflection under both of its names: ``grpc.reflection.v1.ServerReflection`` (the current one,
which newer tools such as grpcurl and Postman try first, some of them only) and ``grpc.reflection.v1alpha``
(what ``grpcio-reflection`` serves; older tools know only it).

``grpcio-reflection`` (1.85) ships v1alpha alone. The two protocols have the same messages with the same field
numbers under another package (grpc/grpc-proto, ``grpc/reflection/v1/reflection.proto``: "v1alpha ... is
deprecated; use v1"), so one servicer answers both: v1alpha's descriptor is copied into the descriptor pool
under package ``grpc.reflection.v1`` (so that v1 itself can be reflected), and v1's method is registered as a
generic handler that (de)serialises with v1alpha's message classes, byte for byte the same on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME                     # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"


def _v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to ``pool`` (v1alpha's file under the v1 package), once."""
    try:
        pool.FindFileByName(V1_FILE_NAME)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old = "." + file.package + "."
    file.name, file.package = V1_FILE_NAME, V1_PACKAGE
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, f".{V1_PACKAGE}.")
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(old, f".{V1_PACKAGE}.")
    pool.Add(file)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``service_names`` (both reflection services are
    listed too). Call before ``server.start()``."""
    pool = descriptor_pool.Default()
    _v1_descriptor(pool)
    servicer = reflection.aio.ReflectionServicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME),
                                                 pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))
