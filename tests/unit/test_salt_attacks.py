"""Output attacks on salted splits: threat models granted through capabilities, the salt-recovery reader, the
minimal-knowledge cloud's clusters, the experiment record and report (standard and salted models trained alike), and
the CLI's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from splitveil.attack.output import OUTPUT_ATTACKS, OutputTarget
from splitveil.attack.training import StopRule
from splitveil.core.errors import ConfigError
from splitveil.data.images import ImageData
from splitveil.models.vision_zoo import build_vision_model
from splitveil.plan.plan import SplitPlan, apply
from splitveil.protect.salt import SaltConfig, salt_model

SHAPE, CLASSES = (1, 12, 12), 10
TINY_RULE = StopRule(patience=3, lr_patience=2, max_epochs=80)  # a plateau within seconds on these sizes


def target(*, aux: bool = True, position: int = 1, cut: int = 2):
    torch.manual_seed(0)
    model = salt_model(build_vision_model("vgg", SHAPE, CLASSES), SaltConfig(position=position), input_shape=SHAPE,
                       num_classes=CLASSES).eval()
    edge, cloud = apply(model, SplitPlan.two_way(cut))
    data = ImageData("random", torch.rand(400, *SHAPE), torch.randint(CLASSES, (400,)), CLASSES) if aux else None
    return model, edge, cloud, OutputTarget.from_parts(edge, cloud, image_shape=SHAPE, table=model.table, aux=data)


def test_registry_lists_the_attacks():
    assert OUTPUT_ATTACKS.names() == ["cluster", "recovery", "unsalted"]


def test_recovery_needs_auxiliary_data():
    *_, without = target(aux=False)
    with pytest.raises(ConfigError, match="auxiliary data"):
        OUTPUT_ATTACKS.get("recovery")(without)
    OUTPUT_ATTACKS.get("unsalted")(without)  # needs only the cloud part


def test_attacks_hold_private_copies_and_never_the_salts():
    model, edge, cloud, offered = target()
    attack = OUTPUT_ATTACKS.get("recovery")(offered, stop=StopRule(max_epochs=1))
    caps = attack.target
    assert caps.edge.owner is not model and caps.cloud.owner is not model
    ours = {id(p) for p in model.parameters()}
    assert not ours & ({id(p) for p in caps.edge.parameters()} | {id(p) for p in caps.cloud.parameters()})
    unsalted = OUTPUT_ATTACKS.get("unsalted")(offered)
    assert unsalted.target.edge is None  # not declared, not granted
    assert torch.equal(unsalted.reconstruct(torch.zeros(3, 1)), torch.zeros(3, dtype=torch.int64))


def test_recovery_reads_the_salt_of_an_untrained_salted_model():
    model, edge, cloud, offered = target()
    attack = OUTPUT_ATTACKS.get("recovery")(offered, stop=TINY_RULE, seed=1).fit()
    assert attack.training_record()["attacker_converged"]
    images, salts = torch.rand(200, *SHAPE), torch.randint(CLASSES, (200,))
    with torch.no_grad():
        features = edge((images, salts))
    recovered = attack.reconstruct(features)
    assert recovered.shape == salts.shape
    assert float((recovered == salts).float().mean()) > 0.5  # chance is 0.1: the salt maps survive one block


def test_the_cluster_attack_holds_only_the_features():
    *_, offered = target()
    attack = OUTPUT_ATTACKS.get("cluster")(offered)
    caps = attack.target
    assert caps.edge is None and caps.cloud is None and caps.aux is None  # no weights, no data of its own
    threat = attack.describe()
    assert not (threat["knows_head_weights"] or threat["knows_cloud_weights"] or threat["auxiliary_data"])
    *_, without = target(aux=False)
    OUTPUT_ATTACKS.get("cluster")(without)  # needs nothing a target could withhold
    with pytest.raises(ConfigError, match="unknown clustering method"):
        OUTPUT_ATTACKS.get("cluster")(offered, method="dbscan")


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_clusters_of_the_features_find_the_salts_without_the_model(method):
    """On a salted model whose salt maps dominate the features (untrained, unit-scale salt maps), the groups found in
    the features alone are the salts; a random partition, matched the same way, is far below."""
    from splitveil.metrics.clustering import matched_accuracy

    _, edge, _, offered = target()
    images, salts = torch.rand(300, *SHAPE), torch.randint(CLASSES, (300,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = edge((images, salts))
    groups = OUTPUT_ATTACKS.get("cluster")(offered, method=method).reconstruct(features)
    found = matched_accuracy(groups, salts, clusters=CLASSES, classes=CLASSES)
    chance = matched_accuracy(torch.randint(CLASSES, (300,)), salts, clusters=CLASSES, classes=CLASSES)
    assert found > 0.9 and chance < 0.3
    # and they are not the images' groups: the same salt for every request leaves nothing to find
    with torch.no_grad():
        same_salt = edge((images, torch.zeros(300, dtype=torch.int64)))
    groups = OUTPUT_ATTACKS.get("cluster")(offered, method=method).reconstruct(same_salt)
    assert matched_accuracy(groups, salts, clusters=CLASSES, classes=CLASSES) < 0.3


def test_run_output_attack_record_and_report(tmp_path, monkeypatch):
    from splitveil.experiments.output_privacy import OutputAttackSpec, run_output_attack, write_output_report

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    spec = OutputAttackSpec(dataset="digits", model="lenet", split=2, train_size=200, aux_size=128, test_size=50,
                            salted_epochs=1, attacker=TINY_RULE)
    record = run_output_attack(spec)
    for key in ("accuracy_standard", "accuracy_standard_base", "accuracy_salted", "cloud_accuracy_unsalted_read",
                "salt_recovery", "cloud_accuracy_with_recovered_salt", "salt_cluster_accuracy",
                "salt_cluster_accuracy_gmm", "salt_cluster_accuracy_random_partition", "seconds"):
        assert 0 <= record[key] <= (1 if key != "seconds" else 1e6), key
    # the salt survives one block of a barely trained model: the reader, trained to its plateau, recovers it (chance
    # 0.1), and with it the cloud decodes exactly what the client decodes
    assert record["salt_recovery"] >= 0.95 and record["chance_salt"] == 0.1
    assert record["cloud_accuracy_with_recovered_salt"] == pytest.approx(record["accuracy_salted"], abs=0.05)
    assert record["attacker_converged"] and record["attacker_epochs"] < TINY_RULE.max_epochs
    assert record["spec"]["attacker"] == TINY_RULE.to_dict()
    assert record["salt_layer"] == 1 and record["split_equals_unsplit"]
    # like for like: the same base, then the same fine-tuning for the standard and the salted model
    training = record["training"]
    assert training["standard"]["base"] == training["salted"]["base"]
    assert {k: v for k, v in training["standard"]["fine_tune"].items() if k != "salt"} == \
        {k: v for k, v in training["salted"]["fine_tune"].items() if k != "salt"}
    assert training["salted"]["fine_tune"]["epochs"] == spec.salted_epochs
    assert record["threat_models"]["cluster"]["knows_head_weights"] is False
    assert run_output_attack(spec)["models_cached"] == {"base": True, "standard": True, "salted": True}
    paths = write_output_report([record], tmp_path / "out", "stem")
    assert all(p.is_file() for p in paths)
    assert "trained alike" in paths[2].read_text()
    assert json.loads(paths[0].read_text().splitlines()[0])["kind"] == "output-privacy"


@pytest.mark.parametrize("args, message", [
    (["--defence", "noise"], "unknown --defence"),
    (["--defence", "salt:xyz"], "unknown salt kind"),
    (["--split", "2", "--salt-layer", "2"], "must be below --split"),
    (["--split", "9"], "out of range"),
])
def test_cli_refuses_bad_options(args, message, capsys):
    from splitveil.cli.main import main

    assert main(["attack", "output", *args]) == 2
    assert message in capsys.readouterr().err
