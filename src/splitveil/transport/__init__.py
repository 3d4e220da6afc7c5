"""Transports carry frames between the device and a remote runtime, counting bytes and round trips."""

from splitveil.transport.base import Transport, TransportStats
from splitveil.transport.loopback import LoopbackTransport

__all__ = ["Transport", "TransportStats", "LoopbackTransport"]
