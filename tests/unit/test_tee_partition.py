"""TEE partitioning: the selection rule and cost model on recorded figures, and partitioned == unpartitioned through
the trusted executor's service (in process, loopback frames), with tampered and replayed input refused."""

from __future__ import annotations

import pytest
import torch

from splitveil.models.vision_zoo import build_vision_model
from splitveil.tee.channel import AttestationKey, SealError
from splitveil.tee.cost import CostModel, partition_costs
from splitveil.tee.executor import EnclaveClient, EnclaveService
from splitveil.tee.process import executor_part, segment_copy
from splitveil.tee.select import choose_cut, partition_table, strongest_by_cut
from splitveil.transport.loopback import LoopbackTransport

SHAPE = (1, 12, 12)

# strongest-attack SSIM per cut of the published quick VGG records (benchmarks/results/image-privacy_..._vgg_quick)
RECORDED = [{"split": c, "attack": a, "ssim": s, "mine": m} for c, a, s, m in [
    (1, "inverse", 0.965, 5.16), (1, "cgan", 0.972, 5.16), (2, "inverse", 0.893, 4.66), (2, "cgan", 0.893, 4.66),
    (3, "inverse", 0.853, 4.05), (3, "cgan", 0.861, 4.05), (4, "inverse", 0.746, 3.54), (4, "cgan", 0.732, 3.54),
    (5, "inverse", 0.641, 2.33), (5, "cgan", 0.620, 2.33)]]


def test_strongest_attack_per_cut():
    best = strongest_by_cut(RECORDED)
    assert {c: r["attack"] for c, r in best.items()} == {1: "cgan", 2: "inverse", 3: "cgan", 4: "inverse", 5: "inverse"}


@pytest.mark.parametrize("tau, chosen", [(0.66, 5), (0.75, 4), (0.80, 4), (0.87, 3), (0.99, 1), (0.5, None)])
def test_selection_rule_on_recorded_figures(tau, chosen):
    ssim = {c: r["ssim"] for c, r in strongest_by_cut(RECORDED).items()}
    assert choose_cut(ssim, tau) == chosen
    if chosen is not None:
        assert ssim[chosen] < tau and all(ssim[c] >= tau for c in ssim if c < chosen)


def test_selection_takes_the_smallest_cut_even_if_a_deeper_one_leaks_more():
    assert choose_cut({1: 0.9, 2: 0.5, 3: 0.7}, 0.6) == 2


def test_cost_model_speedup():
    seconds = [1.0, 1.0, 1.0, 1.0]  # three blocks and a head
    costs = partition_costs(seconds, [1, 2, 3], model=CostModel(enclave_slowdown=4.0), seal_seconds=0.0)
    assert costs[1]["speedup_vs_all_tee"] == pytest.approx(16 / (4 + 3))
    assert costs[3]["speedup_vs_all_tee"] == pytest.approx(16 / 13)
    # no enclave overhead and the same machine outside: no speed-up; an accelerator adds to it
    flat = partition_costs(seconds, [2], model=CostModel(enclave_slowdown=1.0), seal_seconds=0.5)
    assert flat[2]["speedup_vs_all_tee"] == pytest.approx(1.0)
    fast = partition_costs(seconds, [2], model=CostModel(enclave_slowdown=1.0, accelerator_speedup=10), seal_seconds=0)
    assert fast[2]["speedup_vs_all_tee"] == pytest.approx(4 / 2.2)


def test_partition_table_shape():
    costs = partition_costs([1.0] * 6, [1, 2, 3, 4, 5], model=CostModel(), seal_seconds=0.01)
    table = partition_table(RECORDED, costs, 0.75)
    assert table["chosen_cut"] == 4 and table["tau"] == 0.75
    assert [row["cut"] for row in table["cuts"]] == [1, 2, 3, 4, 5]
    row = table["cuts"][3]
    assert row["attack"] == "inverse" and row["ssim"] == 0.746 and row["mine"] == 3.54 and row["speedup_vs_all_tee"] > 1


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_vision_model("vgg", SHAPE, 10).eval()
    key = AttestationKey.generate()
    return model, key


def enclave(model, key, cut, **kwargs):
    part, measurement = executor_part(model, cut, f"vgg [0, {cut})")
    cloud, _ = segment_copy(model, model.num_prologue + cut, len(model.segments), "cloud")
    service = EnclaveService(part, attestation=key, measurement=measurement, input_shape=SHAPE, release=cloud.forward,
                             max_batch=8, **kwargs)
    return service, measurement


def client(service, key, measurement):
    public = AttestationKey.from_public_bytes(key.public_bytes())
    return EnclaveClient(LoopbackTransport(service.handle), attestation=public, expected_measurement=measurement).connect()


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_partitioned_equals_unpartitioned(setup, cut):
    model, key = setup
    service, measurement = enclave(model, key, cut)
    images = torch.rand(11, *SHAPE)
    logits = client(service, key, measurement).logits(images)  # two sealed messages (8 + 3)
    with torch.no_grad():
        whole = model(images)
    assert torch.allclose(logits, whole, atol=1e-5) and torch.equal(logits.argmax(-1), whole.argmax(-1))


def test_executor_holds_only_the_first_part(setup):
    model, key = setup
    part, _ = executor_part(model, 2, "vgg [0, 2)")
    held = {id(p) for p in part.parameters()}
    assert len(list(part.modules())) == model.num_prologue + 2
    assert not held & {id(p) for p in model.parameters()}  # copies, not the model's tensors


def test_host_sees_only_ciphertext(setup):
    model, key = setup
    observed: list[bytes] = []
    service, measurement = enclave(model, key, 2, observed=observed)
    images = torch.rand(2, *SHAPE)
    client(service, key, measurement).logits(images)
    raw = images.numpy().tobytes()
    assert all(raw[:64] not in frame for frame in observed)


def test_tampered_and_replayed_input_refused_through_the_service(setup):
    model, key = setup
    service, measurement = enclave(model, key, 2)
    images = torch.rand(1, *SHAPE)
    user = client(service, key, measurement)
    sealed = bytearray(user.seal_images(images))
    sealed[12] ^= 0x80
    with pytest.raises(SealError, match="authentication failed"):
        user.send_sealed(bytes(sealed))
    user = client(service, key, measurement)
    first = user.seal_images(images)
    user.send_sealed(first)
    with pytest.raises(SealError, match="replayed"):
        user.send_sealed(first)  # relayed again by the host in a fresh, well-formed frame
    assert service.refused == 2


def test_client_refuses_an_executor_with_other_weights(setup):
    model, key = setup
    service, _ = enclave(model, key, 2)
    _, other = executor_part(model, 3, "vgg [0, 3)")
    with pytest.raises(SealError, match="expected"):
        client(service, key, other)


def test_mobilenet_models():
    small = build_vision_model("mobilenet", (1, 28, 28), 10)
    assert small.num_blocks == 5 and small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    from splitveil.models.mobilenet import imagenet_key, mobilenet_v2_imagenet

    big = mobilenet_v2_imagenet()
    assert big.num_blocks == 19
    names = list(big.state_dict())
    assert imagenet_key(names[0], 19) == "features.0.0.weight"
    assert imagenet_key(names[-1], 19) == "classifier.1.bias"
