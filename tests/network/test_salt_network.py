"""Salted split classifier over the real service (127.0.0.1, TLS): decoded labels equal in-process ones, and no
frame carries the salt."""

from __future__ import annotations

import pytest
import torch

from splitveil.core.errors import TransportError
from splitveil.protect.salt_client import SaltedSplitClassifier, vision_service
from splitveil.models.vision_zoo import build_vision_model
from splitveil.protect.salt import SaltConfig, SaltKey, decode_labels, predict_salted, salt_model
from splitveil.transport.network import WebSocketTransport
from splitveil.wire.frame import FrameKind, decode_frame

pytestmark = pytest.mark.network

SHAPE, CLASSES, CUT = (1, 12, 12), 10, 2


@pytest.fixture(scope="module")
def salted():
    torch.manual_seed(0)
    return salt_model(build_vision_model("vgg", SHAPE, CLASSES), SaltConfig(position=1), input_shape=SHAPE,
                      num_classes=CLASSES).eval()


class Recording(WebSocketTransport):
    """Keeps every frame it sends and receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent, self.received = [], []

    def _request(self, frame: bytes) -> bytes:
        self.sent.append(bytes(frame))
        reply = super()._request(frame)
        self.received.append(bytes(reply))
        return reply


def connect(server, tls_files, salted, key: bytes) -> SaltedSplitClassifier:
    transport = Recording(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=20)
    return SaltedSplitClassifier(salted, CUT, transport=transport, key=SaltKey(salted.values, key=key))


def test_tls_decoded_labels_equal_in_process_and_no_frame_carries_the_salt(serve_service, tls_files, salted):
    server = serve_service(vision_service(salted, CUT, max_batch=8))
    images = torch.rand(20, *SHAPE)
    clients = [connect(server, tls_files, salted, key) for key in (b"a" * 32, b"b" * 32)]
    try:
        decoded = [client.logits(images) for client in clients]
    finally:
        for client in clients:
            client.close()
    for client, logits in zip(clients, decoded):
        salts = SaltKey(salted.values, key=client.key.key).draw(len(images))  # the same salts, drawn again
        in_process = predict_salted(salted, images, salts)
        assert torch.equal(logits.argmax(-1), decode_labels(in_process, salts, salted.table))
        assert torch.allclose(logits, in_process.gather(1, salted.table[salts]), atol=1e-5)
        in_process_split = SaltedSplitClassifier(salted, CUT, key=SaltKey(salted.values, key=client.key.key))
        assert torch.equal(in_process_split.classify(images), logits.argmax(-1))  # loopback == network
        # every frame sent: OPEN, FORWARDs of exactly the edge features (batches of 8), CLOSE; nothing else
        sent = [decode_frame(data) for data in client.transport.sent]
        assert [f.kind for f in sent] == [FrameKind.OPEN, *[FrameKind.FORWARD] * 3, FrameKind.CLOSE]
        features = client.edge((images, salts))
        assert torch.equal(torch.cat([f.tensor for f in sent[1:-1]]), features)
        assert sum(len(d) for d in client.transport.sent) == client.transport.stats.bytes_up
    # the salt is in no frame: the two clients' salts differ, yet their frames differ only in the session id and
    # in the feature bytes (same kinds, sequence numbers, parts, codecs, shapes)
    salts_a, salts_b = (SaltKey(salted.values, key=k).draw(len(images)) for k in (b"a" * 32, b"b" * 32))
    assert not torch.equal(salts_a, salts_b)
    for data_a, data_b in zip(clients[0].transport.sent, clients[1].transport.sent):
        a, b = decode_frame(data_a), decode_frame(data_b)
        assert (a.kind, a.seq, a.part, a.codec, len(data_a)) == (b.kind, b.seq, b.part, b.codec, len(data_b))
        assert (a.tensor is None) == (b.tensor is None)
        if a.tensor is not None:
            assert a.tensor.shape == b.tensor.shape and a.tensor.dtype == torch.float32
    # what the server answered is the salted logits: reading them as unsalted does not give the client's labels
    replies = [decode_frame(d) for d in clients[0].transport.received]
    salted_logits = torch.cat([f.tensor for f in replies if f.kind == FrameKind.RESULT])
    assert torch.equal(decode_labels(salted_logits, salts_a, salted.table), decoded[0].argmax(-1))


def test_vision_service_refuses_wrong_shapes(serve_service, tls_files, salted):
    server = serve_service(vision_service(salted, CUT))
    client = connect(server, tls_files, salted, b"c" * 32)
    try:
        client.stage.open()
        with pytest.raises(TransportError, match="expected inputs of shape"):
            client.stage._forward(torch.zeros(2, 3, 6, 6))
    finally:
        client.close()


@pytest.mark.slow
def test_splitveil_serve_serves_a_salted_cloud_part(tmp_path, monkeypatch):
    """`splitveil serve --model lenet --dataset digits --split 2 --defence salt` in its own process, over TLS."""
    from splitveil.experiments.output_privacy import OutputAttackSpec, prepare_models
    from splitveil.serve.process import ServerProcess

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    spec = OutputAttackSpec.quick(dataset="digits", model="lenet", split=2, salt="conv")  # what `serve` loads
    models = prepare_models(spec)  # trained here and cached; the server loads the same weights from the cache
    salted, test = models["salted"], models["splits"].test
    args = ["--dataset", "digits", "--defence", "salt"]
    with ServerProcess("lenet", (2,), extra_args=args) as server:
        client = SaltedSplitClassifier.connect(salted, 2, server.url, token=server.token, ca_file=server.cert,
                                               key=SaltKey(salted.values, key=b"d" * 32))
        try:
            labels = client.classify(test.images[:50])
        finally:
            client.close()
    salts = SaltKey(salted.values, key=b"d" * 32).draw(50)
    assert torch.equal(labels, decode_labels(predict_salted(salted, test.images[:50], salts), salts, salted.table))


def test_salted_sensor_cnn_over_tls_equals_in_process(serve_service, tls_files):
    """The time-series modality through the same service: a salted sensor CNN's cloud part over TLS."""
    from splitveil.models.timeseries import build_time_series_model

    torch.manual_seed(1)
    shape = (6, 100)
    model = salt_model(build_time_series_model("sensor-cnn", shape, 4), SaltConfig(position=1), input_shape=shape,
                       num_classes=4).eval()
    server = serve_service(vision_service(model, CUT, max_batch=8))
    series = torch.randn(12, *shape)
    transport = Recording(server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=20)
    client = SaltedSplitClassifier(model, CUT, transport=transport, key=SaltKey(model.values, key=b"c" * 32))
    try:
        labels = client.classify(series)
    finally:
        client.close()
    salts = SaltKey(model.values, key=b"c" * 32).draw(len(series))
    assert torch.equal(labels, decode_labels(predict_salted(model, series, salts), salts, model.table))
    sent = [decode_frame(data) for data in transport.sent]
    assert all(f.tensor.shape[1:] == (32, 50) for f in sent if f.tensor is not None)  # the edge's features only
