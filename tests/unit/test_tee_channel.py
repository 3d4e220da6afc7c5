"""The sealed channel: simulated attestation, X25519 handshake, AES-GCM sealing, refusal of tampering and replay."""

from __future__ import annotations

import os

import pytest
import torch

from splitveil.tee.channel import (
    AttestationKey,
    ClientHandshake,
    Quote,
    SealError,
    executor_handshake,
)
from splitveil.tee.measure import measure

SESSION = os.urandom(16)


@pytest.fixture(scope="module")
def key():
    return AttestationKey.generate()


def pair(key, measurement=b"m" * 32, *, expected=None, verify_with=None, session=SESSION):
    client = ClientHandshake(session, attestation=verify_with or AttestationKey.from_public_bytes(key.public_bytes()),
                             expected_measurement=expected or measurement)
    quote, executor = executor_handshake(client.hello(), session, attestation=key, measurement=measurement)
    return client.finish(Quote.from_bytes(quote.to_bytes())), executor


def test_handshake_agrees_on_keys_both_ways(key):
    client, executor = pair(key)
    assert executor.open(client.seal(b"images")) == b"images"
    assert client.open(executor.seal(b"logits")) == b"logits"
    assert client.seal(b"x") != client.seal(b"x")  # fresh counter, fresh nonce


def test_sealed_bytes_hide_the_plaintext(key):
    client, _ = pair(key)
    secret = b"private image bytes " * 8
    assert secret not in client.seal(secret) and secret[:16] not in client.seal(secret)


def test_wrong_measurement_is_refused(key):
    with pytest.raises(SealError, match="measurement is"):
        pair(key, b"a" * 32, expected=b"b" * 32)


def test_quote_signed_by_another_key_is_refused(key):
    with pytest.raises(SealError, match="signature"):
        pair(key, verify_with=AttestationKey.from_public_bytes(AttestationKey.generate().public_bytes()))


def test_quote_for_another_session_is_refused(key):
    client = ClientHandshake(SESSION, attestation=key, expected_measurement=b"m" * 32)
    quote, _ = executor_handshake(client.hello(), os.urandom(16), attestation=key, measurement=b"m" * 32)
    with pytest.raises(SealError, match="signature"):
        client.finish(quote)


@pytest.mark.parametrize("position", [0, 8, 20, -1])
def test_tampered_message_is_refused_with_one_line(key, position):
    client, executor = pair(key)
    sealed = bytearray(client.seal(b"some input tensor bytes"))
    sealed[position] ^= 0x01
    with pytest.raises(SealError) as error:
        executor.open(bytes(sealed))
    assert "\n" not in error.value.message and "refused" in error.value.message


def test_replayed_and_reordered_messages_are_refused(key):
    client, executor = pair(key)
    first, second = client.seal(b"one"), client.seal(b"two")
    assert executor.open(first) == b"one"
    with pytest.raises(SealError, match="replayed"):
        executor.open(first)
    assert executor.open(second) == b"two"
    third, fourth = client.seal(b"3"), client.seal(b"4")
    assert executor.open(fourth) == b"4"
    with pytest.raises(SealError, match="replayed"):
        executor.open(third)  # older than one already accepted


def test_message_of_another_session_is_refused(key):
    client_a, _ = pair(key)
    _, executor_b = pair(key, session=os.urandom(16))
    with pytest.raises(SealError, match="authentication"):
        executor_b.open(client_a.seal(b"x"))


def test_reflected_message_is_refused(key):
    client, executor = pair(key)
    with pytest.raises(SealError):
        client.open(client.seal(b"sent back to its sender"))


def test_measurement_covers_weights_and_label():
    state = {"w": torch.ones(3, 3)}
    base = measure(state, label="vgg [0, 2)")
    assert base == measure({"w": torch.ones(3, 3)}, label="vgg [0, 2)")
    assert base != measure({"w": torch.ones(3, 3) * 1.0001}, label="vgg [0, 2)")
    assert base != measure(state, label="vgg [0, 3)")
    assert len(base) == 32
