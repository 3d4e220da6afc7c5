"""What the attestation measures (tee/measure.py), the sealed executor's inner sessions, the plain client's refusal of
a sealed server, and the attestation key files (hardening II, items 1, 5 and 6)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch

from splitveil.cli.main import optional_values
from splitveil.core.errors import ConfigError
from splitveil.edge.remote import RemoteStage, probe_server
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.tiny import tiny_causal_lm
from splitveil.plan.plan import SplitPlan, apply
from splitveil.serve.service import PartService
from splitveil.tee.channel import AttestationKey, read_attestation_key
from splitveil.tee.enclave_lm import attestation_key_file, client_attestation
from splitveil.tee.executor import SealedFrameService, SealedTransport
from splitveil.tee.measure import loaded_code, measure_process, parse_measurement
from splitveil.transport.loopback import LoopbackTransport
from splitveil.wire.frame import Frame, FrameKind, decode_frame, encode_frame

CUTS = (1, 3)


def test_loaded_code_covers_every_file_of_each_imported_package_by_its_relative_name():
    names = dict(loaded_code())
    assert "splitveil/serve/service.py" in names
    assert "splitveil/experiments/slip_eval.py" in names  # never imported here: a lazy import is covered too
    assert "torch/__init__.py" in names and any(n.startswith("transformers/") for n in names) is ("transformers" in sys.modules)
    assert any(n.endswith(".so") for n in names)  # native code the process runs
    assert not any(n.startswith("/") for n in names)
    assert list(names) == sorted(names)


def test_changing_any_measured_file_or_the_config_changes_the_measurement(tmp_path):
    files = []
    for name in ("pkg/__init__.py", "pkg/lazy.py", "dep/core.py"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n")
        files.append((name, str(path)))
    state = {"w": torch.ones(2, 2)}
    base = measure_process(state, config={"role": "x"}, files=files)
    assert base == measure_process(state, config={"role": "x"}, files=list(reversed(files)))  # canonical order
    assert base != measure_process(state, config={"role": "y"}, files=files)
    assert base != measure_process({"w": torch.ones(2, 2) * 1.0001}, config={"role": "x"}, files=files)
    for _, path in files:
        original = open(path).read()
        with open(path, "a") as handle:
            handle.write("LEAK = '/tmp/operator-reads-this'\n")
        assert measure_process(state, config={"role": "x"}, files=files) != base, path
        with open(path, "w") as handle:
            handle.write(original)
    assert measure_process(state, config={"role": "x"}, files=files) == base


def test_parse_measurement_takes_64_hex_digits_only():
    assert parse_measurement("ab" * 32) == bytes.fromhex("ab" * 32)
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_measurement("abc")


def test_attest_alone_means_local_and_a_value_is_kept():
    assert optional_values(["generate", "--attest", "--attest-key", "k"]) == ["generate", "--attest=local", "--attest-key", "k"]
    assert optional_values(["generate", "--attest"]) == ["generate", "--attest=local"]
    assert optional_values(["generate", "--attest", "ab" * 32]) == ["generate", "--attest", "ab" * 32]


def test_attestation_key_files(tmp_path):
    created, fresh = attestation_key_file(tmp_path / "attest.key", tmp_path)
    assert fresh and stat.S_IMODE(os.stat(created).st_mode) == 0o600
    private = read_attestation_key(created, private=True)
    public_from_private = read_attestation_key(created, private=False)
    assert public_from_private.private is None  # the client keeps the public half only
    public_file = read_attestation_key(tmp_path / "attest.key.pub", private=False)
    assert public_file.public_bytes() == private.public_bytes() == public_from_private.public_bytes()
    again, fresh = attestation_key_file(created, tmp_path)
    assert again == created and not fresh
    (tmp_path / "hex").write_text(private.public_bytes().hex())
    assert read_attestation_key(tmp_path / "hex", private=False).public_bytes() == private.public_bytes()
    with pytest.raises(ConfigError, match="only a public key"):
        read_attestation_key(tmp_path / "attest.key.pub", private=True)
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not an Ed25519"):
        read_attestation_key(tmp_path / "junk", private=False)
    with pytest.raises(ConfigError, match="--attest-key"):
        client_attestation("local", None, "m", CUTS)
    key, measurement = client_attestation("cd" * 32, tmp_path / "attest.key.pub", "m", None)
    assert measurement == bytes.fromhex("cd" * 32) and key.private is None


@pytest.fixture
def sealed():
    torch.manual_seed(0)
    splittable = CausalLMSplittable(tiny_causal_lm("llama"))
    parts = apply(splittable, SplitPlan.lambda_split(*CUTS))
    inner = PartService({1: parts[1]}, hidden_size=splittable.hidden_size, info={"cuts": list(CUTS)}, max_sessions=4)
    key = AttestationKey.generate()
    observed: list[bytes] = []
    service = SealedFrameService(inner, attestation=key, measurement=b"m" * 32, observed=observed, max_sessions=64)
    return service, inner, AttestationKey.from_public_bytes(key.public_bytes()), observed, splittable.hidden_size


def _attested(service, public) -> SealedTransport:
    return SealedTransport(LoopbackTransport(service.handle), attestation=public, expected_measurement=b"m" * 32).connect()


def test_one_inner_session_per_sealed_session_closed_with_it(sealed):
    service, inner, public, _, _ = sealed
    transport = _attested(service, public)
    first = decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN))))
    assert first.kind == FrameKind.OK and len(inner.sessions) == 1
    second = decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN))))
    assert second.kind == FrameKind.ERROR and "already has a session" in second.message
    assert len(inner.sessions) == 0  # a refusal ends the inner session, as it ends a plain connection's
    assert decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN)))).kind == FrameKind.OK
    outer = transport.client.session
    service.close_session(outer)  # the connection dropped (the server closes its session) or it was evicted
    assert len(inner.sessions) == 0 and outer not in service.sessions


def test_dropped_connections_do_not_leak_inner_sessions(sealed):
    service, inner, public, _, _ = sealed
    for _ in range(3 * inner.max_sessions):  # before the fix: "server is full" after max_sessions drops
        transport = _attested(service, public)
        reply = decode_frame(transport.request(encode_frame(Frame(FrameKind.OPEN))))
        assert reply.kind == FrameKind.OK, reply.message
        service.close_session(transport.client.session)
    assert len(inner.sessions) == 0
    service.evict_idle(-1.0)  # eviction goes through close_session too
    transport = _attested(service, public)
    transport.request(encode_frame(Frame(FrameKind.OPEN)))
    assert len(inner.sessions) == 1
    service.evict_idle(-1.0)
    assert len(inner.sessions) == 0


def test_a_plain_client_refuses_a_sealed_server_and_sends_nothing(sealed):
    service, _, _, observed, hidden = sealed
    stage = RemoteStage(LoopbackTransport(service.handle), 1, "fp32", recover_seconds=0)
    with pytest.raises(ConfigError, match="sealed channel"):
        stage.open()
    with pytest.raises(ConfigError, match="--attest"):
        probe_server(LoopbackTransport(service.handle))
    kinds = [decode_frame(frame).kind for frame in observed]
    assert set(kinds) <= {FrameKind.OPEN, FrameKind.CLOSE}  # no FORWARD: no hidden state left the client
    assert json.loads(service.info and json.dumps(service.info))["sealed_channel"] is True


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "x", "--split", "2,28", "--attest"], "attest a --server"),
    (["generate", "--prompt", "x", "--server", "ws://127.0.0.1:1", "--split", "2,28", "--attest-key", "k"],
     "--attest-key goes with --attest"),
    (["edge", "--local", "--attest"], "go with --server"),
    (["edge", "--server", "ws://127.0.0.1:1", "--attest-key", "k"], "--attest-key goes with --attest"),
    (["serve", "--enclave", "--split", "2,28", "--host", "0.0.0.0", "--insecure"], "non-loopback"),
])
def test_attest_flags_refuse_what_does_not_fit_in_one_line(args, message, capsys):
    from splitveil.cli.main import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
