"""The remote side: a service that runs the cloud parts of a plan for many sessions."""

from splitveil.serve.service import PartService

__all__ = ["PartService"]
