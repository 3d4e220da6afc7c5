"""PartService with a shaped (CNN) part: its frames are validated against the exact feature shape, counted as rows,
never batched; hidden-state parts beside it keep their validation; the loopback client equals in process."""

from __future__ import annotations

import json

import pytest
import torch

from splitveil.protect.salt_client import CLOUD_PART, SaltedSplitClassifier, vision_service
from splitveil.models.vision_zoo import build_vision_model
from splitveil.protect.salt import SaltConfig, SaltKey, decode_labels, predict_salted, salt_model
from splitveil.serve.service import PartService
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

SHAPE, CLASSES, CUT = (1, 12, 12), 10, 2


@pytest.fixture(scope="module")
def salted():
    torch.manual_seed(0)
    return salt_model(build_vision_model("vgg", SHAPE, CLASSES), SaltConfig(position=1), input_shape=SHAPE,
                      num_classes=CLASSES).eval()


def send(service: PartService, frame: Frame) -> Frame:
    return decode_frame(service.handle(encode_frame(frame)))


def test_shaped_part_frames(salted):
    service = vision_service(salted, CUT, max_batch=4, max_tokens=6)
    opened = send(service, Frame(FrameKind.OPEN))
    info, session = json.loads(opened.message), opened.session
    features = (32, 6, 6)
    assert info["input_shapes"] == {str(CLOUD_PART): list(features)} and info["max_batch"] == 4
    x = torch.rand(4, *features)
    reply = send(service, Frame(FrameKind.FORWARD, x, session=session, seq=0, part=CLOUD_PART))
    assert reply.kind == FrameKind.RESULT and reply.tensor.shape == (4, CLASSES)
    assert service.sessions[session].tokens == 4  # rows, not rows x channels
    bad = {"3-d hidden states": torch.rand(1, 3, 32), "wrong channels": torch.rand(1, 16, 6, 6),
           "wrong size": torch.rand(1, 32, 7, 6), "too many rows": torch.rand(5, *features),
           "over the session's rows": torch.rand(3, *features)}
    messages = {}
    for name, tensor in bad.items():
        opened = send(service, Frame(FrameKind.OPEN))
        seq = 0
        if name == "over the session's rows":
            send(service, Frame(FrameKind.FORWARD, torch.rand(4, *features), session=opened.session, seq=0, part=CLOUD_PART))
            seq = 1
        reply = send(service, Frame(FrameKind.FORWARD, tensor, session=opened.session, seq=seq, part=CLOUD_PART))
        assert reply.kind == FrameKind.ERROR, name
        messages[name] = reply.message
    assert "expected inputs of shape [batch, 32, 6, 6]" in messages["wrong channels"]
    assert "exceeds the limit of 4" in messages["too many rows"]
    assert "limit of 6 positions" in messages["over the session's rows"]
    ints = send(service, Frame(FrameKind.FORWARD, torch.zeros(1, *features, dtype=torch.int64), codec="int64",
                               session=session, seq=1, part=CLOUD_PART))
    assert ints.kind == FrameKind.ERROR and "float tensor" in ints.message


def test_hidden_state_parts_keep_their_validation(salted):
    cloud = vision_service(salted, CUT).parts[CLOUD_PART]
    service = PartService({0: cloud, CLOUD_PART: cloud}, hidden_size=8, input_shapes={CLOUD_PART: (32, 6, 6)})
    session = send(service, Frame(FrameKind.OPEN)).session
    reply = send(service, Frame(FrameKind.FORWARD, torch.rand(1, 32, 6, 6), session=session, seq=0, part=0))
    assert reply.kind == FrameKind.ERROR and "[batch, positions, 8]" in reply.message


def test_loopback_client_equals_in_process(salted):
    images = torch.rand(10, *SHAPE)
    client = SaltedSplitClassifier(salted, CUT, key=SaltKey(salted.values, key=b"e" * 32))
    labels = client.classify(images)
    salts = SaltKey(salted.values, key=b"e" * 32).draw(10)
    assert torch.equal(labels, decode_labels(predict_salted(salted, images, salts), salts, salted.table))
    assert client.transport.stats.round_trips == 2  # OPEN + one FORWARD of 10 rows
