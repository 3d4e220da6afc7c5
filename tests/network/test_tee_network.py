"""The trusted executor and the accelerator as TLS servers on 127.0.0.1 (in threads, tiny CNN): partitioned ==
unpartitioned over real sockets; the accelerator receives the feature map at p and nothing else; tampered and
replayed sealed input is refused with one line and the connection closed."""

from __future__ import annotations

import pytest
import torch

from splitveil.models.vision_zoo import build_vision_model
from splitveil.serve.build import build_classifier_service
from splitveil.serve.server import SplitServer
from splitveil.tee.channel import AttestationKey, SealError
from splitveil.tee.executor import AcceleratorLink, EnclaveClient, EnclaveService
from splitveil.tee.process import executor_part
from splitveil.transport.network import WebSocketTransport
from splitveil.transport.tls import fingerprint_pem, server_context
from splitveil.wire.frame import FrameKind, decode_frame

pytestmark = pytest.mark.network

SHAPE, CUT = (1, 12, 12), 2


class Recording(WebSocketTransport):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def _request(self, frame: bytes) -> bytes:
        self.sent.append(bytes(frame))
        return super()._request(frame)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from splitveil.serve.auth import new_token
    from splitveil.transport.tls import generate_self_signed

    torch.manual_seed(0)
    model = build_vision_model("mobilenet", SHAPE, 10).eval()
    folder = tmp_path_factory.mktemp("tee")
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    generate_self_signed(cert, key_file)
    pin, token = fingerprint_pem(cert), new_token()
    accelerator = SplitServer(build_classifier_service(model, CUT, example=torch.zeros(1, *SHAPE)), token=token,
                              ssl_context=server_context(cert, key_file)).start_in_thread()
    link_transport = Recording(accelerator.url, token=token, pin_sha256=pin)
    key = AttestationKey.generate()
    part, measurement = executor_part(model, CUT, "mobilenet [0, 2)")
    service = EnclaveService(part, attestation=key, measurement=measurement, input_shape=SHAPE,
                             release=AcceleratorLink(link_transport, classes=10), max_batch=16)
    enclave = SplitServer(service, token=token, ssl_context=server_context(cert, key_file)).start_in_thread()
    yield {"model": model, "enclave": enclave, "token": token, "pin": pin, "key": key, "measurement": measurement,
           "accelerator_frames": link_transport.sent}
    enclave.stop()
    accelerator.stop()


def connect(d):
    transport = WebSocketTransport(d["enclave"].url, token=d["token"], pin_sha256=d["pin"])
    public = AttestationKey.from_public_bytes(d["key"].public_bytes())
    return EnclaveClient(transport, attestation=public, expected_measurement=d["measurement"]).connect()


def test_partitioned_over_tls_equals_unpartitioned(deployment):
    images = torch.rand(20, *SHAPE)
    client = connect(deployment)
    logits = client.logits(images)
    client.close()
    with torch.no_grad():
        whole = deployment["model"](images)
        features = deployment["model"].run(images[:16], 0, CUT)
    assert torch.allclose(logits, whole, atol=1e-5) and torch.equal(logits.argmax(-1), whole.argmax(-1))
    forwards = [decode_frame(f) for f in deployment["accelerator_frames"]]
    forwards = [f for f in forwards if f.kind == FrameKind.FORWARD]
    assert torch.equal(forwards[0].tensor, features)  # the feature map at p, and no image, left the executor


def test_tampered_and_replayed_refused_over_tls(deployment):
    images = torch.rand(1, *SHAPE)
    client = connect(deployment)
    sealed = bytearray(client.seal_images(images))
    sealed[-3] ^= 0x10
    with pytest.raises(SealError, match="authentication failed") as error:
        client.send_sealed(bytes(sealed))
    assert "\n" not in error.value.message
    client = connect(deployment)
    first = client.seal_images(images)
    client.send_sealed(first)
    with pytest.raises(SealError, match="replayed"):
        client.send_sealed(first)
