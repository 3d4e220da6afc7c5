"""Bearer tokens: generated, read from files, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from splitveil.core.errors import ConfigError

MIN_TOKEN_CHARS = 16


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token(path: Path) -> str:
    """The token in `path` (surrounding whitespace ignored); ConfigError when missing, empty or too short."""
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read the token file {path}: {error.strerror or error}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters")
    return token


def write_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (of digests, so that lengths leak nothing either)."""
    if presented is None:
        return False
    a = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def token_id(token: str) -> bytes:
    """A short digest that identifies a token without holding it (sessions are bound to it)."""
    return hashlib.sha256(b"splitveil-session-binding:" + token.encode()).digest()[:16]


def bearer(header_value: str | None) -> str | None:
    if not header_value:
        return None
    scheme, _, value = header_value.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
