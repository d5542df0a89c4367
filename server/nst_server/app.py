"""Assemble and run the asyncio gRPC server: StyleTransfer, standard health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nst_client._proto.nst.v1 import style_transfer_pb2 as pb
from nst_client._proto.nst.v1 import style_transfer_pb2_grpc as pb_grpc
from nst_server.model import StyleModels
from nst_server.servicer import ServerLimits, StyleTransferServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StyleTransfer"].full_name  # "nst.v1.StyleTransfer"


@dataclass
class ServerConfig:
    """How to run the server.

    Attributes:
        model_path: the ``.onnx`` file written by ``nst-export``.
        host, port: where to listen; port 0 picks a free port (the bound port is logged and printed).
        providers: execution providers to try in order (default TensorRT, CUDA, CPU).
        limits: per-job and admission limits.
        max_receive_message_bytes: gRPC receive limit for requests, bytes.
        grace_s: on SIGTERM/SIGINT, running jobs get this long to finish.
    """

    model_path: str
    host: str = "127.0.0.1"
    port: int = 50051
    providers: list[str] | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_receive_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 10.0


def warm_up(models: StyleModels) -> None:
    """One session pass and one replica forward/backward at 32 px, so the first job does not pay for set-up."""
    image = torch.rand(1, 3, 32, 32, device=models.device, requires_grad=True)
    models.features(image)
    sum(out.sum() for out in models.replica(image)).backward()


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Load the model, warm it up, serve until SIGTERM/SIGINT, then shut down gracefully.

    Health (``grpc.health.v1``) is NOT_SERVING until the model is loaded and warmed up, and again from the
    moment a shutdown signal arrives; new jobs are then refused with UNAVAILABLE and running ones get
    ``grace_s`` seconds.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    servicer = StyleTransferServicer(None, config.limits)        # UNAVAILABLE until the model is loaded
    pb_grpc.add_StyleTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()

    loop = asyncio.get_running_loop()
    models = await loop.run_in_executor(None, lambda: StyleModels.load(config.model_path, config.providers))
    await loop.run_in_executor(None, warm_up, models)
    servicer.models = models
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (execution providers %s)", SERVICE_NAME, config.host, port, models.providers)
    print(f"nst-server listening on {config.host}:{port}", flush=True)
    if ready is not None:
        ready.set()

    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down: NOT_SERVING, refusing new jobs, %.0f s grace for running ones", config.grace_s)
    servicer.accepting = False
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    servicer.close()
