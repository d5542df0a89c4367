"""TLS, the bearer token (UNAUTHENTICATED, health open unless --auth-health), reflection, and the client
library and CLI options for them, through real nst-server processes on 127.0.0.1 (port 0). The certificate
is self-signed, made here with ``cryptography`` for ``localhost`` and ``127.0.0.1``."""

from __future__ import annotations

import datetime
import ipaddress
import re

import grpc
import pytest

import serving
from nst_client import NSTClient, NSTError
from nst_client.cli import main as client_main

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """(certificate path, key path): a self-signed PEM certificate for localhost / 127.0.0.1, valid 1 day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls_server(onnx_path, certificate, tmp_path_factory):
    """TLS with the token from $NST_AUTH_TOKEN; health left open (the default)."""
    cert, key = certificate
    process = serving.start(onnx_path, tmp_path_factory.mktemp("tls_server") / "server.log",
                            ["--tls-cert", cert, "--tls-key", key], env={"NST_AUTH_TOKEN": TOKEN},
                            client_options={"tls_ca": cert, "token": TOKEN})
    try:
        yield process
    finally:
        process.stop()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(NSTError) as error:
        call()
    return error.value.code


def test_tls_client_with_the_ca_and_token_runs_a_job(tls_server, certificate, small_images):
    with NSTClient(tls_server.target, tls_ca=certificate[0], token=TOKEN) as client:
        assert client.health() == "SERVING"
        assert len(client.model_info().weights_sha256) == 64
        result = client.stylize(*small_images, max_side_px=32, iterations=2)
        assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE"


def test_the_asyncio_client_speaks_tls_and_sends_the_token(tls_server, certificate, small_images):
    import asyncio

    from nst_client import AsyncNSTClient

    async def run():
        async with AsyncNSTClient(tls_server.target, tls_ca=certificate[0], token=TOKEN) as client:
            assert await client.health() == "SERVING"
            assert len((await client.model_info()).weights_sha256) == 64
            result = await client.stylize(*small_images, max_side_px=32, iterations=2)
        async with AsyncNSTClient(tls_server.target, tls_ca=certificate[0], token="wrong") as client:
            with pytest.raises(NSTError) as error:
                await client.model_info()
        return result, error.value
    result, error = asyncio.run(run())
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE"
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_or_untrusting_clients_cannot_talk_to_the_tls_server(tls_server):
    with NSTClient(tls_server.target, token=TOKEN) as client:                     # no TLS
        assert _code(lambda: client.health(timeout_s=5)) in (grpc.StatusCode.UNAVAILABLE,
                                                             grpc.StatusCode.DEADLINE_EXCEEDED)
    with NSTClient(tls_server.target, tls=True, token=TOKEN) as client:          # system roots only
        assert _code(lambda: client.health(timeout_s=5)) in (grpc.StatusCode.UNAVAILABLE,
                                                             grpc.StatusCode.DEADLINE_EXCEEDED)


def test_missing_or_wrong_token_is_unauthenticated_and_health_stays_open(tls_server, certificate, small_images):
    for token in (None, "wrong"):
        with NSTClient(tls_server.target, tls_ca=certificate[0], token=token) as client:
            assert client.health() == "SERVING"                                  # open by default
            assert _code(client.model_info) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: client.stylize(*small_images, max_side_px=32, iterations=2)) \
                == grpc.StatusCode.UNAUTHENTICATED
    log = tls_server.log()
    assert re.search(r"rpc=/nst.v1.StyleTransfer/GetModelInfo job=- status=UNAUTHENTICATED", log)
    assert re.search(r"rpc=/nst.v1.StyleTransfer/SubmitJob job=- status=UNAUTHENTICATED", log)   # stylize's
    assert TOKEN not in log


def test_reflection_lists_the_services_with_the_token(tls_server, certificate):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    credentials = grpc.ssl_channel_credentials(open(certificate[0], "rb").read())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                                 metadata=(("authorization", f"Bearer {TOKEN}"),)))
        names = {service.name for service in replies[0].list_services_response.service}
        assert {"nst.v1.StyleTransfer", "grpc.health.v1.Health"} <= names
        with pytest.raises(grpc.RpcError) as error:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_takes_tls_ca_and_token(tls_server, certificate, capsys):
    server = ["--server", tls_server.target, "--tls-ca", certificate[0]]
    assert client_main(["health", *server]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert client_main(["info", *server, "--token", TOKEN]) == 0
    assert "weightsSha256" in capsys.readouterr().out
    assert client_main(["info", *server, "--token", "wrong"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_auth_health_protects_health_too(onnx_path, tmp_path):
    server = serving.start(onnx_path, tmp_path / "server.log", ["--auth-token", TOKEN, "--auth-health"],
                           client_options={"token": TOKEN})
    try:
        with NSTClient(server.target) as client:
            assert _code(client.health) == grpc.StatusCode.UNAUTHENTICATED
        with NSTClient(server.target, token=TOKEN) as client:
            assert client.health() == "SERVING"
            assert client.model_info().weights_sha256
    finally:
        assert server.stop() == 0


def test_tls_needs_certificate_and_key(onnx_path, capsys):
    from nst_server.cli import main as server_main
    assert server_main(["--model", str(onnx_path), "--port", "0", "--tls-cert", "server.pem"]) == 2
    assert "--tls-key" in capsys.readouterr().err


def test_no_request_field_names_a_path():
    """The server never writes to a path a client names: every image travels as bytes, and the only string
    in a request is a VGG layer name (checked against the fixed list); a new string field must be added here
    knowingly."""
    from google.protobuf.descriptor import FieldDescriptor

    from nst_proto.v1 import style_transfer_pb2 as pb

    def string_fields(descriptor, seen=()):
        for field in descriptor.fields:
            if field.type == FieldDescriptor.TYPE_STRING:
                yield f"{descriptor.full_name}.{field.name}"
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type not in seen:
                yield from string_fields(field.message_type, (*seen, descriptor))

    assert set(string_fields(pb.StylizeRequest.DESCRIPTOR)) <= {"nst.v1.LayerWeight.layer"}
    assert list(string_fields(pb.GetModelInfoRequest.DESCRIPTOR)) == []
