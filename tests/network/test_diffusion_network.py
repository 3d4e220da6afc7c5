"""The diffusion trunk served over TLS on 127.0.0.1: pictures equal loopback's bit for bit, and the transport's
byte counts equal loopback's."""

from __future__ import annotations

import pytest

from splitveil.diffusion.cloud import build_diffusion_service
from splitveil.diffusion.generate import GenerationSpec, generate_image, run_generation
from splitveil.diffusion.models import load_diffusion
from splitveil.transport.network import WebSocketTransport

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def model():
    return load_diffusion("tiny-diffusion")


@pytest.mark.parametrize("placement, head_blocks, wire", [("unet-split", 1, "fp32"), ("unet-split", 2, "int8"),
                                                          ("reference", 1, "fp16")])
def test_tls_trunk_equals_loopback(serve_service, tls_files, model, placement, head_blocks, wire):
    server = serve_service(build_diffusion_service(model, placement, head_blocks))
    spec = GenerationSpec("a photo of a bag", placement=placement, head_blocks=head_blocks, steps=3, wire=wire)
    local = run_generation(model, spec)
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=20)
    try:
        remote = generate_image(model, spec, transport=transport)
    finally:
        transport.close()
    assert remote.image_sha256 == local.image_sha256
    assert (remote.bytes_up, remote.bytes_down, remote.round_trips) == (local.bytes_up, local.bytes_down, local.round_trips)


def test_the_server_refuses_a_client_of_another_placement(serve_service, tls_files, model):
    from splitveil.core.errors import ConfigError

    server = serve_service(build_diffusion_service(model, "reference"))
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=20)
    try:
        with pytest.raises(ConfigError):
            generate_image(model, GenerationSpec("a bag", placement="unet-split", steps=2), transport=transport)
    finally:
        transport.close()
