"""Every image attack beats the mean-image baseline on tiny data, and refuses a target that lacks what it needs."""

import pytest
import torch

from splitveil.attack.image import IMAGE_ATTACKS, ImageTarget
from splitveil.attack.training import StopRule
from splitveil.core.errors import ConfigError
from splitveil.data.images import load_dataset, split_dataset
from splitveil.metrics.image import mse, ssim
from splitveil.models.vision_zoo import build_vision_model
from splitveil.plan.plan import SplitPlan, apply
from splitveil.train.classifier import TrainConfig, accuracy, predict, train_classifier

#: per attack: keyword arguments that keep it to a few seconds on 8x8 digits (the learned ones still stop on a plateau)
TINY_RULE = StopRule(patience=2, lr_patience=1, min_delta=0.03, max_epochs=60)
TINY_OPTIONS = {"rmle": {"steps": 120}, "inverse": {"stop": TINY_RULE}, "shadow": {"stop": TINY_RULE},
                "cgan": {"stop": TINY_RULE}}


@pytest.fixture(scope="module")
def victim():
    """A VGG-style classifier trained on 8x8 digits, split after its first block, with the attacker's data."""
    splits = split_dataset(load_dataset("digits"), train=900, aux=700, test=120, seed=0)
    torch.manual_seed(0)
    model = build_vision_model("vgg", (1, 8, 8), 10)
    train_classifier(model, splits.train.images, splits.train.labels, TrainConfig(epochs=4, seed=0), quiet=True)
    edge, cloud = apply(model, SplitPlan.two_way(1))
    target = ImageTarget.from_parts(edge, cloud, image_shape=(1, 8, 8), aux=splits.aux)
    return {"splits": splits, "model": model, "target": target}


def test_the_tiny_victim_learned_something(victim):
    test = victim["splits"].test
    assert accuracy(predict(victim["model"], test.images), test.labels) > 0.6


def test_every_registered_attack_has_tiny_settings():
    assert sorted(TINY_OPTIONS) == IMAGE_ATTACKS.names()


@pytest.mark.parametrize("name", sorted(TINY_OPTIONS))
def test_attack_beats_the_mean_image(victim, name):
    target, splits = victim["target"], victim["splits"]
    originals = splits.test.images[:60]
    features = target.query(originals)
    attack = IMAGE_ATTACKS.get(name)(target, seed=0, **TINY_OPTIONS[name]).fit(features)
    reconstructions = attack.reconstruct(features)
    assert reconstructions.shape == originals.shape
    baseline = splits.aux.images.mean(0, keepdim=True).expand_as(originals)
    assert mse(reconstructions, originals) < 0.8 * mse(baseline, originals), name
    assert ssim(reconstructions, originals) > ssim(baseline, originals) + 0.05, name
    record = attack.training_record()
    if name == "rmle":
        assert record == {}  # optimises per image, learns nothing
    else:
        assert record["attacker_converged"], record  # stopped on a plateau, well before the cap
        assert record["attacker_epochs"] < TINY_RULE.max_epochs * len(record["attacker_phases"])


@pytest.mark.parametrize("feature_shape, image_shape, levels", [
    ((8, 14, 14), (1, 28, 28), 2), ((6, 7, 7), (1, 28, 28), 2), ((32, 4, 4), (1, 8, 8), 1), ((16, 2, 2), (3, 32, 32), 0),
    ((40,), (1, 28, 28), 0)])
def test_the_cgan_generator_is_a_unet_of_the_right_shapes(feature_shape, image_shape, levels):
    from splitveil.attack.image.cgan import UNetGenerator

    torch.manual_seed(0)
    generator = UNetGenerator(feature_shape, image_shape).eval()
    assert len(generator.down) == len(generator.up) == levels
    features = torch.rand(3, *feature_shape)
    out = generator(features)
    assert out.shape == (3, *image_shape) and 0 <= out.min() and out.max() <= 1


def test_the_unet_skips_carry_the_input_past_a_dead_bottleneck():
    """With the deepest encoder level zeroed, everything reaching the output through the bottleneck is constant;
    the output still depends on the features only through the skip connections."""
    from splitveil.attack.image.cgan import UNetGenerator

    torch.manual_seed(0)
    generator = UNetGenerator((8, 14, 14), (1, 28, 28)).eval()
    with torch.no_grad():
        deepest = generator.down[-1][0]
        deepest.weight.zero_()
        deepest.bias.zero_()
        a, b = torch.rand(2, 8, 14, 14), torch.rand(2, 8, 14, 14)
        assert not torch.allclose(generator(a), generator(b))


@pytest.mark.parametrize("name, withheld, missing", [
    ("rmle", {"edge": None}, "the edge part's weights"),
    ("inverse", {"query": None}, "query access to the edge"),
    ("inverse", {"aux": None}, "auxiliary data"),
    ("cgan", {"query": None, "aux": None}, "query access to the edge and auxiliary data"),
    ("shadow", {"cloud": None}, "the cloud part's weights"),
    ("shadow", {"aux": None}, "auxiliary data"),
])
def test_construction_fails_when_the_target_lacks_what_the_threat_model_needs(victim, name, withheld, missing):
    from dataclasses import replace

    target = replace(victim["target"], **withheld)
    with pytest.raises(ConfigError, match=f"the {name} attack needs {missing}"):
        IMAGE_ATTACKS.get(name)(target)


@pytest.mark.parametrize("name", sorted(TINY_OPTIONS))
def test_an_attack_keeps_only_what_it_declared(victim, name):
    attack = IMAGE_ATTACKS.get(name)(victim["target"])
    threat, kept = attack.threat_model, attack.target
    assert (kept.edge is not None) == threat.knows_head_weights
    assert (kept.query is not None) == threat.queries_edge
    assert (kept.cloud is not None) == threat.knows_cloud_weights
    assert (kept.aux is not None) == threat.auxiliary_data


def test_the_shadow_attack_never_queries_the_edge(victim):
    attack = IMAGE_ATTACKS.get("shadow")(victim["target"])
    assert attack.target.query is None and attack.target.edge is None


def _record(split, mine_runs, attack="inverse"):
    image = [[[0.5] * 4] * 4]
    return {"model": "vgg", "dataset": "digits", "attack": attack, "split": split, "feature_shape": [8, 4, 4],
            "accuracy": 0.9, "sizes": {"test": 10, "train": 10, "aux": 10, "attacked": 2}, "baseline_ssim": 0.1,
            "baseline_psnr": 10.0, "ssim": 0.9 - 0.1 * split, "psnr": 20.0, "mse": 0.01, "recon_accuracy": 0.8,
            "mine": sum(mine_runs) / len(mine_runs), **({"mine_runs": mine_runs} if len(mine_runs) > 1 else {}),
            "dcor": 0.8, "dcor_unbiased": 0.7, "attack_seconds": 1.0, "evaluator": {"model": "lenet", "accuracy_on_originals": 0.8},
            "threat_model": {"description": "d"}, "examples": {"originals": [image], "reconstructions": [image]}}


def test_the_report_states_mi_intervals_and_only_the_order_two_estimators_support(tmp_path):
    """Regression: the report gave MINE means alone, and the docs called a fall "monotone" where the seeds of one cut
    spread wider than the step between cuts. An order between cuts now needs two estimators apart beyond their spread."""
    from splitveil.experiments.image_privacy import write_image_report
    from splitveil.experiments.image_report import attacker_training, mine_intervals

    def estimates(mine, knn):
        return {"mine": {"mean": sum(mine) / 3, "low": min(mine), "high": max(mine), "runs": mine},
                "knn": {"mean": sum(knn) / 3, "low": min(knn), "high": max(knn), "runs": knn}}

    records = [_record(1, [4.75, 5.29, 5.34]), _record(2, [3.93, 4.80, 5.11]), _record(3, [3.24, 3.79, 3.42])]
    records[0]["mutual_information"] = estimates([4.75, 5.29, 5.34], [3.0, 3.1, 3.2])
    records[1]["mutual_information"] = estimates([3.93, 4.80, 5.11], [2.5, 2.6, 2.7])  # MINE overlaps cut 1
    records[2]["mutual_information"] = estimates([3.24, 3.79, 3.42], [2.0, 2.1, 2.2])  # both fall beyond the spread
    records[1].update(attacker_epochs=62, attacker_converged=True)
    intervals = mine_intervals(records)
    assert intervals[2] == {"mean": pytest.approx(4.6133, abs=1e-4), "low": 3.93, "high": 5.11, "seeds": 3}
    *_, depth, markdown = write_image_report(records, tmp_path, "r")
    text = markdown.read_text()
    assert "| 4.613 [3.93, 5.11] (3) |" in text and "| 62 (plateau) |" in text
    assert "- cuts 1 -> 2: no order claimed (no ordering supported (not every estimator separates them)" in text
    assert "- cuts 2 -> 3: less information at the deeper cut (every estimator agrees" in text
    assert "| 2 | 4.61 [3.93, 5.11] (3) | 2.60 [2.50, 2.70] (3) |" in text
    assert depth.stat().st_size > 1000
    assert attacker_training({"attacker_epochs": 200, "attacker_converged": False}) == "200 (cap)"
    assert attacker_training({}) == "-"
    single = [_record(1, [4.0]), _record(2, [3.0])]  # an old record: MINE alone, one seed
    text = write_image_report(single, tmp_path, "s")[-1].read_text()
    assert "| 4.000 (1 seed) |" in text and "no order claimed (needs 2 estimators" in text
