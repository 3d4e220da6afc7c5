"""The one protection contract: every protection a registered deployment that names its parties, their trust and its
attacker; one observation hook on every transport."""

from __future__ import annotations

import json

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.plan.plan import Placement
from splitveil.protect.deployment import DEPLOYMENTS, MODALITIES, Deployment, DeploymentRegistry, Party


def test_every_shipped_protection_is_listed_with_its_parties_trust_and_attacker():
    listed = {(cls.modality, cls.name): cls.listing() for cls in DEPLOYMENTS.all()}
    for name in ("none", "noise", "permute", "randcut", "slip", "enclave"):
        assert ("text", name) in listed
    for name in ("siftfunnel", "noise", "dropout", "nopeek", "cem", "vib", "tee-partition"):
        assert ("image", name) in listed
    assert ("output", "salt") in listed and ("weights", "slip") in listed
    for entry in listed.values():
        assert entry["modality"] in MODALITIES and entry["summary"] and entry["attacker"]["command"]
        assert entry["parties"][0]["name"] in ("device", "secure side")  # the party that keeps the secret comes first
        for party in entry["parties"]:
            assert party["holds"] and party["trust"].startswith(("trusted", "untrusted"))
            Placement(party["placement"])
    enclave = listed["text", "enclave"]
    assert any("SIMULATED" in line for line in enclave["assumptions"])
    assert {p["placement"] for p in enclave["parties"]} == {"edge", "trusted", "cloud"}
    assert {p["placement"] for p in listed["text", "slip"]["parties"]} == {"edge", "executor"}
    for entry in listed.values():  # every part is run by one of the deployment's parties
        assert set(entry["placement"]) <= {p["placement"] for p in entry["parties"]}
    enclave_plan = DEPLOYMENTS.get("enclave", "text").split_plan((2, 28))
    assert enclave_plan.cuts == (2, 28) and enclave_plan.placement == (Placement.EDGE, Placement.TRUSTED, Placement.EDGE)


def test_the_registry_refuses_duplicates_unknown_names_and_deployments_without_parties():
    registry = DeploymentRegistry()
    registry._loaded = True  # an empty registry of its own

    class Thing(Deployment):
        name, modality = "thing", "text"
        parties = (Party("device", Placement.EDGE, "everything", "trusted: the user's"),)
        attacker = {"command": "none", "attacks": []}

    registry.register(Thing)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Thing)
    with pytest.raises(ConfigError, match="unknown text protection 'other'; known: thing"):
        registry.get("other", "text")

    class Bare(Deployment):
        name, modality = "bare", "text"

    with pytest.raises(ValueError, match="parties and its attacker"):
        registry.register(Bare)

    class Sound(Thing):
        name, modality = "sound", "audio"

    with pytest.raises(ValueError, match="unknown modality"):
        registry.register(Sound)


def test_every_text_deployment_has_its_adaptive_attacker():
    from splitveil.attack.text.adaptive import EnclaveAdaptation, SlipAdaptation, adaptation_for

    for name in DEPLOYMENTS.names("text"):
        adaptation_for(name, 0.0)
    assert isinstance(adaptation_for("enclave"), EnclaveAdaptation) and isinstance(adaptation_for("slip"), SlipAdaptation)
    assert adaptation_for("enclave").attack_options("exact") == {"max_verified": 4096}


def test_the_enclave_deployment_refuses_a_strength_and_a_head_of_no_layers():
    enclave = DEPLOYMENTS.get("enclave", "text")
    enclave.check(0, (2, 28))
    with pytest.raises(ConfigError, match="no strength"):
        enclave.check(1, (2, 28))
    with pytest.raises(ConfigError, match="0 < A < B"):
        enclave.check(0, (0, 28))


def test_the_cli_lists_protections_as_json_and_refuses_a_bad_modality(capsys):
    from splitveil.cli.main import main

    assert main(["protections", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["protections"]
    assert len(items) == len(DEPLOYMENTS.all()) >= 8
    assert all(i["name"] and i["modality"] and i["parties"] and i["attacker"] for i in items)
    assert main(["protections", "--modality", "output"]) == 0
    assert "salt:" in capsys.readouterr().out
    assert main(["protections", "--modality", "audio"]) == 2
    assert "unknown --modality 'audio'" in capsys.readouterr().err


def test_a_transport_observer_sees_every_round_trip_while_it_watches_and_none_after():
    from splitveil.transport.loopback import LoopbackTransport

    transport = LoopbackTransport(lambda frame: frame[::-1])
    seen = []
    transport.request(b"before")
    with transport.observe(lambda frame, reply: seen.append((frame, reply))):
        transport.request(b"abc")
        transport.request(b"de")
    transport.request(b"after")
    assert seen == [(b"abc", b"cba"), (b"de", b"ed")] and transport.observers == []


def test_observing_a_split_records_what_its_cloud_received(tiny_models):
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan
    from splitveil.protect.text import observe

    model = tiny_models["llama"]
    lm = SplitCausalLM(model, SplitPlan.lambda_split(1, 3))
    seen = observe(lm, torch.tensor([[5, 17, 3]]), 4)
    assert seen.uplink.shape == (3 + 3, 32)  # the prompt's 3 positions, then one per generated token but the last
    assert len(seen.generated_ids) == 4 and len(seen.downlink) == len(seen.uplink)


def test_a_service_observer_sees_every_frame_it_receives_malformed_ones_included(tiny_models):
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan

    lm = SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(1, 3))
    received, sent = [], []
    lm.service.observers.append(received.append)
    with lm.transport.observe(lambda frame, reply: sent.append(frame)):
        lm.generate(torch.tensor([[5, 17, 3]]), max_new_tokens=3)
    assert received == sent and len(received) >= 4  # OPEN, the prompt, two steps (and CLOSE)
    assert lm.service.handle(b"not a frame")  # refused with an error frame, and seen
    assert received[-1] == b"not a frame"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    from splitveil.models.tiny import save_tiny_with_tokenizer

    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("protect") / "tiny")


def test_generate_protect_runs_a_registered_text_deployment(tiny_folder, capsys):
    from splitveil.cli.main import main

    common = ["generate", "--model", tiny_folder, "--split", "1,3", "--prompt", "hello", "-n", "6", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--protect", "permute", "--strength", "1"]) == 0  # exact: the device un-permutes
    permuted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert permuted["token_ids"] == plain["token_ids"]
    assert permuted["protection"]["name"] == "permute" and "permuted" in permuted["protection"]["cloud_holds"]
    assert main([*common, "--protect", "noise", "--strength", "0.5", "--sample", "--seed", "3"]) == 0  # sampled too
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protection"]["strength"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--protect", "cloak"], "unknown text protection 'cloak'"),
    (["--protect", "randcut", "--strength", "1.5"], "number of layers"),
    (["--strength", "1"], "--strength goes with --protect"),
    (["--protect", "noise", "--no-split"], "give --split A,B"),
])
def test_generate_protect_refuses_bad_flags_with_one_line(tiny_folder, capsys, argv, message):
    from splitveil.cli.main import main

    split = [] if "--no-split" in argv else ["--split", "1,3"]
    assert main(["generate", "--model", tiny_folder, *split, "--prompt", "hi", *argv]) == 2
    assert message in capsys.readouterr().err
