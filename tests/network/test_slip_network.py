"""SLIP over the real network stack: the executor behind SplitServer (TLS, bearer token), in a thread and as a
`splitveil slip serve` child process."""

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from splitveil.core.errors import TransportError
from splitveil.edge.generate import SplitCausalLM
from splitveil.models.tiny import tiny_causal_lm
from splitveil.protect.slip.client import SlipClient
from splitveil.protect.slip.executor import SlipExecutorService, save_residual
from splitveil.protect.slip.runtime import ExecutorProcess, connect_client, read_frame_log, run_generation
from splitveil.protect.slip.trusted import SlipConfig, SlipModel
from splitveil.protect.slip.view import masked_view
from splitveil.serve.server import ServerLimits, SplitServer
from splitveil.transport.network import WebSocketTransport
from splitveil.transport.tls import server_context
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

pytestmark = pytest.mark.network
PROMPT = [1, 5, 9, 3, 7, 2]


def slip_model(mode="fixed"):
    return SlipModel(tiny_causal_lm("llama", weight_scale=1.0), SlipConfig(mode=mode, rank=2, include_head=True),
                     generator=np.random.default_rng(0))


def expected_tokens():
    plain = tiny_causal_lm("llama", weight_scale=1.0)
    return SplitCausalLM(plain).generate(PROMPT, max_new_tokens=10, eos_token_ids=()).token_ids


@pytest.fixture
def slip_server(tls_files):
    servers = []

    def start(slip, **options):
        service = SlipExecutorService(slip.executor_weights(), mode=slip.config.mode, **options)
        server = SplitServer(service, token=tls_files["token"], ssl_context=server_context(tls_files["cert"], tls_files["key"]),
                             limits=ServerLimits(batch_window=0.0)).start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("mode", ["fixed", "float"])
def test_generation_through_the_tls_executor_equals_the_plain_model(slip_server, tls_files, mode):
    slip = slip_model(mode)
    server = slip_server(slip)
    transport = WebSocketTransport(server.url, token=tls_files["token"], ca_file=tls_files["cert"])
    client = SlipClient(transport, expect={"mode": mode, "groups": len(slip.groups)})
    slip.attach(client)
    result = SplitCausalLM(slip.model, None, transport=transport).generate(PROMPT, max_new_tokens=10, eos_token_ids=())
    assert result.token_ids == expected_tokens()
    client.close()
    transport.close()


def test_a_malformed_frame_gets_an_error_and_ends_the_connection(slip_server, tls_files):
    server = slip_server(slip_model())
    import ssl

    context = ssl.create_default_context(cafile=str(tls_files["cert"]))
    with connect(server.url, ssl=context, additional_headers={"Authorization": f"Bearer {tls_files['token']}"}) as ws:
        ws.send(encode_frame(Frame(FrameKind.OPEN)))
        session = decode_frame(ws.recv()).session
        ws.send(encode_frame(Frame(FrameKind.FORWARD, torch.tensor([0, 1, 2, 3]), codec="int64", session=session)))
        reply = decode_frame(ws.recv())
        assert reply.kind == FrameKind.ERROR and "takes 1 x" in reply.message
    assert not server.service.sessions


def test_wrong_token_is_refused(slip_server, tls_files):
    server = slip_server(slip_model())
    transport = WebSocketTransport(server.url, token="y" * 40, ca_file=tls_files["cert"])
    with pytest.raises(TransportError, match="401"):
        SlipClient(transport).open()


def test_child_process_executor_over_tls_and_its_logged_view(tmp_path):
    slip = slip_model()
    bundle = save_residual(tmp_path / "bundle", slip.groups, slip.residual_weights(), model="tiny-llama",
                           fixed_point=slip.config.fixed_point)
    log = tmp_path / "frames.bin"
    with ExecutorProcess(tmp_path / "bundle", "fixed", log_frames=log) as executor:
        client, transport = connect_client(executor.url, token=executor.token, mode="fixed", residual_sha256=bundle.sha256,
                                           groups=len(slip.groups), ca_file=executor.cert)
        result = run_generation(slip, None, client, transport, "", max_new_tokens=10, prompt_ids=PROMPT)
        client.close()
        transport.close()
    assert result["token_ids"] == expected_tokens()
    assert result["round_trips_per_decode_step"] == len(slip.groups)
    assert result["pool_refills_during_generation"] == 0
    view = masked_view(read_frame_log(log))
    assert len(view) == len(slip.groups) * 10 and all(entry.values.dtype == torch.int64 for entry in view)
