"""The sealed channel into the trusted executor: a SIMULATED attestation, X25519 key agreement, AES-GCM sealing.

What a real TEE gives and what is simulated here:

- **Measurement.** A real enclave's measurement (SGX MRENCLAVE, TDX MRTD/RTMRs, SEV-SNP launch digest) is computed by
  the CPU over the pages loaded into it. Here `measure` (`tee/measure.py`) hashes every code file the executor
  process has loaded (every `.py` file of each package it imported, ours and third-party, and the native libraries
  it mapped), what it runs and every tensor of the weights it holds (SHA-256); the executor process computes it when
  it is ready, and the client computes the value it expects from its own code and weights (a `--measure-only` run
  of the same start-up), never from the party it verifies.
- **Quote.** A real quote is signed by a key fused into the CPU and certified by the vendor (Intel's PCS, AMD's
  VCEK chain). Here an Ed25519 `AttestationKey` stands in for that key: whoever holds its private half (the executor
  process, given a file at start) can sign any measurement, so this proves nothing against the machine's operator.
  The client trusts the public half it was given, checks the signature and compares the measurement with the one it
  expects (computed from the code and weights it meant to run). Everything else is real cryptography.
- **Key agreement.** The executor makes a fresh X25519 key per session and the quote signs it, with the client's own
  fresh X25519 key and nonce: the session key (HKDF-SHA256 of the shared secret, bound to the whole transcript) is
  known only to the client and the attested executor, and a recorded quote cannot be replayed into another session.
- **Sealing.** AES-256-GCM, one key per direction, a 64-bit message counter in the nonce and the associated data
  (with the session id and the direction). The receiver accepts each counter once and only in increasing order, so
  a tampered message fails authentication and a replayed (or reordered) one is refused before decryption.

Pure functions and one small stateful class (`SealedChannel`); nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from splitveil.core.errors import ConfigError, SplitveilError

PROTOCOL = b"splitveil-tee/1"
NONCE_BYTES = 32
KEY_BYTES = 32  # X25519 public keys, measurements
SIGNATURE_BYTES = 64  # Ed25519
COUNTER = struct.Struct("<Q")
TO_EXECUTOR, TO_CLIENT = b"C2E", b"E2C"  # the two directions of a session
SIMULATED = "SIMULATED attestation (software key, no TEE hardware)"  # how the CLI and records name it


class SealError(SplitveilError):
    """Sealed input refused (tampered, replayed, wrong key) or an attestation that does not verify."""


# -- measurement ---------------------------------------------------------------------------------------------------


# -- the simulated attestation key ---------------------------------------------------------------------------------


class AttestationKey:
    """SIMULATED hardware attestation key (Ed25519). `private` is None on the verifying side."""

    def __init__(self, private=None, public=None):
        self.private, self.public = private, public if public is not None else private.public_key()

    @classmethod
    def generate(cls) -> "AttestationKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> "AttestationKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.from_private_bytes(data))

    @classmethod
    def from_public_bytes(cls, data: bytes) -> "AttestationKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return cls(None, Ed25519PublicKey.from_public_bytes(data))

    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as s

        return self.private.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as s

        return self.public.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)

    def write_private(self, path) -> "Path":
        """Writes the private half (PEM, PKCS#8) to a new file readable by its owner only (mode 0600 from the start)."""
        from pathlib import Path

        from cryptography.hazmat.primitives import serialization as s

        path = Path(path)
        data = self.private.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o600)
        return path

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as s

        return self.public.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.public.verify(signature, message)
            return True
        except InvalidSignature:
            return False


def read_attestation_key(path, *, private: bool) -> AttestationKey:
    """The SIMULATED attestation key in `path`: a PEM private key (what `serve --enclave --attestation-key` writes), a
    PEM public key, 64 hex digits of a raw public key, or the 32 raw bytes of a private key (older files). With
    `private=False` only the public half is kept (the client's verification key: it never needs the private half)."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such attestation key file: {path}")
    data = path.read_bytes()
    key = None
    try:
        if b"PRIVATE KEY" in data:
            key = AttestationKey(s.load_pem_private_key(data, password=None))
        elif b"PUBLIC KEY" in data:
            key = AttestationKey(None, s.load_pem_public_key(data))
        elif len(data.strip()) == 64 and all(c in b"0123456789abcdefABCDEF" for c in data.strip()):
            key = AttestationKey.from_public_bytes(bytes.fromhex(data.strip().decode()))
        elif len(data) == 32:
            key = AttestationKey.from_private_bytes(data)
    except (ValueError, TypeError):
        key = None
    if key is None or not isinstance(key.public, Ed25519PublicKey) or (
            key.private is not None and not isinstance(key.private, Ed25519PrivateKey)):
        raise ConfigError(f"{path} is not an Ed25519 attestation key (PEM private or public key, or 64 hex digits)")
    if private and key.private is None:
        raise ConfigError(f"{path} holds only a public key; the executor needs the private half")
    return key if private else AttestationKey(None, key.public)


# -- handshake -----------------------------------------------------------------------------------------------------


def _x25519():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    return X25519PrivateKey, X25519PublicKey


def _raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def quote_message(measurement: bytes, executor_public: bytes, client_public: bytes, client_nonce: bytes,
                  session: bytes) -> bytes:
    """What the (simulated) quote signs: the measurement bound to this session's keys and the client's nonce."""
    return PROTOCOL + b"/quote\0" + measurement + executor_public + client_public + client_nonce + session


def _session_keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client -> executor key, executor -> client key) from the X25519 secret, bound to the whole transcript."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=hashlib.sha256(transcript).digest(),
                    info=PROTOCOL + b"/session-keys").derive(shared)
    return material[:32], material[32:]


@dataclass(frozen=True)
class Hello:
    """The client's first message: a fresh nonce and X25519 public key."""

    nonce: bytes
    public: bytes

    def to_bytes(self) -> bytes:
        return self.nonce + self.public

    @classmethod
    def from_bytes(cls, data: bytes) -> "Hello":
        if len(data) != NONCE_BYTES + KEY_BYTES:
            raise SealError(f"a hello carries {NONCE_BYTES + KEY_BYTES} bytes, not {len(data)}")
        return cls(bytes(data[:NONCE_BYTES]), bytes(data[NONCE_BYTES:]))


@dataclass(frozen=True)
class Quote:
    """The executor's answer: its session X25519 public key, its measurement and the (simulated) signature."""

    public: bytes
    measurement: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return self.public + self.measurement + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> "Quote":
        if len(data) != 2 * KEY_BYTES + SIGNATURE_BYTES:
            raise SealError(f"a quote carries {2 * KEY_BYTES + SIGNATURE_BYTES} bytes, not {len(data)}")
        return cls(bytes(data[:KEY_BYTES]), bytes(data[KEY_BYTES:2 * KEY_BYTES]), bytes(data[2 * KEY_BYTES:]))


class ClientHandshake:
    """The client's side: `hello()`, then `finish(quote)` -> a `SealedChannel` once the quote verifies."""

    def __init__(self, session: bytes, *, attestation: AttestationKey, expected_measurement: bytes):
        x25519_private, _ = _x25519()
        self.session, self.attestation, self.expected = bytes(session), attestation, bytes(expected_measurement)
        self._key = x25519_private.generate()
        self.nonce = os.urandom(NONCE_BYTES)

    def hello(self) -> Hello:
        return Hello(self.nonce, _raw_public(self._key))

    def finish(self, quote: Quote) -> "SealedChannel":
        _, x25519_public = _x25519()
        hello = self.hello()
        message = quote_message(quote.measurement, quote.public, hello.public, hello.nonce, self.session)
        if not self.attestation.verify(quote.signature, message):
            raise SealError("attestation refused: the quote's signature does not verify with the trusted key")
        if not hmac.compare_digest(quote.measurement, self.expected):
            raise SealError(f"attestation refused: the executor's measurement is {quote.measurement.hex()[:16]}..., "
                            f"not the expected {self.expected.hex()[:16]}... (other code or weights)")
        shared = self._key.exchange(x25519_public.from_public_bytes(quote.public))
        send, receive = _session_keys(shared, message)
        return SealedChannel(self.session, send_key=send, receive_key=receive, send_direction=TO_EXECUTOR,
                             receive_direction=TO_CLIENT)


def executor_handshake(hello: Hello, session: bytes, *, attestation: AttestationKey,
                       measurement: bytes) -> tuple[Quote, "SealedChannel"]:
    """The executor's side: a fresh X25519 key, the signed quote, and the session's channel."""
    x25519_private, x25519_public = _x25519()
    key = x25519_private.generate()
    public = _raw_public(key)
    message = quote_message(measurement, public, hello.public, hello.nonce, bytes(session))
    try:
        shared = key.exchange(x25519_public.from_public_bytes(hello.public))
    except ValueError:
        raise SealError("hello refused: not a valid X25519 public key") from None
    client_to_executor, executor_to_client = _session_keys(shared, message)
    channel = SealedChannel(bytes(session), send_key=executor_to_client, receive_key=client_to_executor,
                            send_direction=TO_CLIENT, receive_direction=TO_EXECUTOR)
    return Quote(public, measurement, attestation.sign(message)), channel


# -- sealing -------------------------------------------------------------------------------------------------------


class SealedChannel:
    """AES-256-GCM both ways with per-direction keys and counters; each received counter is accepted once, in order.

    A sealed message is `counter (8 bytes LE) | ciphertext | tag (16)`; the nonce is the direction and the counter,
    the associated data the protocol, the session id, the direction and the counter.
    """

    def __init__(self, session: bytes, *, send_key: bytes, receive_key: bytes, send_direction: bytes,
                 receive_direction: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.session = session
        self._send, self._receive = AESGCM(send_key), AESGCM(receive_key)
        self._send_direction, self._receive_direction = send_direction, receive_direction
        self.sent = 0  # counter of the next message sealed
        self.accepted = -1  # highest counter opened so far

    def _nonce_aad(self, direction: bytes, counter: int) -> tuple[bytes, bytes]:
        nonce = direction[:4].ljust(4, b"\0") + COUNTER.pack(counter)
        return nonce, PROTOCOL + self.session + direction + COUNTER.pack(counter)

    def seal(self, plaintext: bytes) -> bytes:
        counter = self.sent
        self.sent += 1
        nonce, aad = self._nonce_aad(self._send_direction, counter)
        return COUNTER.pack(counter) + self._send.encrypt(nonce, bytes(plaintext), aad)

    def open(self, sealed: bytes) -> bytes:
        """The plaintext; `SealError` (one line) for a replayed, reordered, truncated or tampered message."""
        from cryptography.exceptions import InvalidTag

        if len(sealed) < COUNTER.size + 16:
            raise SealError("sealed input refused: too short to be a sealed message")
        (counter,) = COUNTER.unpack_from(sealed, 0)
        if counter <= self.accepted:
            raise SealError(f"sealed input refused: replayed message (counter {counter} already used; "
                            f"next must exceed {self.accepted})")
        nonce, aad = self._nonce_aad(self._receive_direction, counter)
        try:
            plaintext = self._receive.decrypt(nonce, bytes(sealed[COUNTER.size:]), aad)
        except InvalidTag:
            raise SealError("sealed input refused: authentication failed (tampered, or sealed for another "
                            "session)") from None
        self.accepted = counter
        return plaintext
