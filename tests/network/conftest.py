"""Servers on 127.0.0.1 for the network tests: in-thread (tiny models) or real subprocesses."""

import socket
import subprocess
import sys
import time

import pytest
import torch

from splitveil.edge.generate import SplitCausalLM
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.serve.auth import new_token, write_token
from splitveil.serve.server import ServerLimits, SplitServer
from splitveil.serve.service import PartService
from splitveil.transport.tls import generate_self_signed, server_context
from splitveil.transport.network import WebSocketTransport

CUTS = (1, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    generate_self_signed(cert, key)
    token_file = folder / "token"
    write_token(token_file, new_token())
    return {"cert": cert, "key": key, "token_file": token_file, "token": token_file.read_text().strip()}


def tiny_service(model, **limits) -> PartService:
    splittable = CausalLMSplittable(model)
    parts = apply(splittable, SplitPlan.lambda_split(*CUTS))
    for part in parts:
        part.last_logits_only = True
    return PartService({1: parts[1]}, hidden_size=splittable.hidden_size, info={"cuts": list(CUTS)}, **limits)


@pytest.fixture
def make_server(tiny_model, tls_files):
    """Starts in-thread TLS servers over the tiny model's trunk; stops them all at the end of the test."""
    servers = []

    def start(*, port: int = 0, limits: ServerLimits = ServerLimits(), tls: bool = True, **service_limits) -> SplitServer:
        context = server_context(tls_files["cert"], tls_files["key"]) if tls else None
        server = SplitServer(tiny_service(tiny_model, **service_limits), token=tls_files["token"], ssl_context=context,
                             port=port, limits=limits).start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def serve_service(tls_files):
    """Starts in-thread servers over any PartService (e.g. over stand-in parts); stops them at the end of the test."""
    servers = []

    def start(service: PartService, *, limits: ServerLimits = ServerLimits(), tls: bool = True) -> SplitServer:
        context = server_context(tls_files["cert"], tls_files["key"]) if tls else None
        server = SplitServer(service, token=tls_files["token"], ssl_context=context, limits=limits).start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def client(tiny_model, tls_files):
    """A split LM whose trunk runs on `server`."""
    made = []

    def connect(server: SplitServer, *, wire: str = "fp32", recover_seconds: float = 0.0, url: str | None = None):
        transport = WebSocketTransport(url or server.url, token=tls_files["token"], ca_file=tls_files["cert"], timeout=20)
        lm = SplitCausalLM(tiny_model, SplitPlan.lambda_split(*CUTS), wire=wire, transport=transport)
        for stage in lm.stages:
            if hasattr(stage, "recover_seconds"):
                stage.recover_seconds = recover_seconds
        made.append(lm)
        return lm

    yield connect
    for lm in made:
        lm.close()


def prompt(seed: int, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 101, (1, length), generator=torch.Generator().manual_seed(seed))


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def start_serve_process(args: list[str], port: int, env=None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "splitveil.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"server did not start: {proc.communicate(timeout=5)[0]}")
    return proc
