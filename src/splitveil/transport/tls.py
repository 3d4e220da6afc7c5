"""TLS for the service: a self-signed certificate for localhost when none is given, fingerprints, SSL contexts.

The client trusts the server either through a CA/certificate file (`--ca`, e.g. the server's own certificate) or
by pinning the SHA-256 fingerprint the server prints at start-up.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from splitveil.core.errors import ConfigError


def generate_self_signed(cert_path: Path, key_path: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                         days: int = 30) -> None:
    """Writes a fresh EC P-256 key and a self-signed certificate valid for `hosts` (key file mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitveil localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def certificate_expires_within(cert_path: Path, *, days: float) -> bool:
    """True when the certificate is unreadable or expires within `days`."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return True
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return remaining < datetime.timedelta(days=days)


def fingerprint_pem(cert_path: Path) -> str:
    """SHA-256 of the certificate's DER bytes, as 64 lowercase hex digits."""
    try:
        der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the certificate {cert_path}: {error}") from None
    return hashlib.sha256(der).hexdigest()


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: our clients never resume sessions, and a ticket written right after the handshake
    # sometimes leaves the server's SSL transport (CPython 3.11) deaf to the client's upgrade request until the 10 s
    # handshake timeout (measured on SplitServer: 6 of 13 runs of 150 connections stalled; 0 of 10 without).
    context.num_tickets = 0
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot use --tls-cert {cert_path} / --tls-key {key_path}: {error}") from None
    return context


def client_context(*, ca_file: Path | None = None, pin_sha256: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against `ca_file`, or accepts exactly the pinned certificate.

    With a pin, chain verification is replaced by comparing the server certificate's SHA-256 after the handshake
    (`check_pin`); hostname checking then has nothing to check against and is off.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if pin_sha256:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"cannot use --ca {ca_file}: {error}") from None
    else:
        context.load_default_certs()
    return context


def normalise_pin(pin: str) -> str:
    digest = pin.lower().removeprefix("sha256:").replace(":", "").strip()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"bad certificate pin {pin!r}: give the 64 hex digits the server printed")
    return digest
