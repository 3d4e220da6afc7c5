"""The experiment specs validate themselves: a Python caller gets the same one-line errors as the CLI, before
anything loads."""

from __future__ import annotations

import pytest

from splitveil.core.errors import SplitveilError as ConfigError  # PlanError (a cut out of range) is one too


@pytest.mark.parametrize("fields, message", [
    ({"cuts": (5, 3)}, "give --split A,B with A < B"),
    ({"attack": "psychic"}, "unknown text attack 'psychic'"),
    ({"wire": "fp8"}, "unknown --wire 'fp8'"),
    ({"ranker": "learned", "attack": "nearest"}, "use it with --attack exact"),
    ({"defence": "cloak"}, "unknown text protection 'cloak'"),
    ({"defence": "randcut", "strength": 1.5}, "number of layers"),
    ({"defence": "enclave", "strength": 1}, "no strength"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
])
def test_text_attack_spec(fields, message):
    from splitveil.experiments.text_privacy import TextAttackSpec

    with pytest.raises(ConfigError, match=message):
        TextAttackSpec(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"split": 9}, "--split 9 is out of range: vgg has 5 blocks"),
    ({"model": "alexnet"}, "unknown vision model 'alexnet'"),
    ({"attack": "psychic"}, "unknown image attack 'psychic'"),
    ({"samples": 1}, "--samples must be from 2"),
    ({"defence": "noise", "strength": -1}, "strength must be >= 0"),
])
def test_image_attack_spec(fields, message):
    from splitveil.experiments.image_privacy import ImageAttackSpec

    with pytest.raises(ConfigError, match=message):
        ImageAttackSpec(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"salt": "rot13"}, "unknown salt kind 'rot13'"),
    ({"split": 2, "salt_layer": 2}, "must be below --split 2"),
    ({"salt_values": 1}, "at least 2"),
    ({"split": 0}, "--split 0 is out of range"),
])
def test_output_attack_spec(fields, message):
    from splitveil.experiments.output_privacy import OutputAttackSpec

    with pytest.raises(ConfigError, match=message):
        OutputAttackSpec(**fields)


def test_partition_and_weights_specs():
    from splitveil.experiments.tee_partition import PartitionSpec
    from splitveil.experiments.weights_attack import WeightsAttackSpec

    with pytest.raises(ConfigError, match="--cuts 6 is out of range"):
        PartitionSpec(cuts=(1, 6))
    with pytest.raises(ConfigError, match="--tau must be in"):
        PartitionSpec(tau=0)
    with pytest.raises(ConfigError, match="unknown weights attack 'psychic'"):
        WeightsAttackSpec(attack="psychic")
    with pytest.raises(ConfigError, match="--rank must be >= 1"):
        WeightsAttackSpec(rank=0)
    PartitionSpec(cuts=(1, 5))  # in range
    WeightsAttackSpec.for_run(quick=True)


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("splitveil.experiments.bench_llm", fromlist=["x"]).LLMBenchSpec(cuts=(28, 2)), "increasing"),
    (lambda: __import__("splitveil.experiments.bench_llm", fromlist=["x"]).LLMBenchSpec(wires=("fp8",)), "unknown wires"),
    (lambda: __import__("splitveil.experiments.bench_batched", fromlist=["x"]).BatchedBenchSpec(sessions=(0,)), "sessions must be at least 1"),
    (lambda: __import__("splitveil.experiments.bench_batched", fromlist=["x"]).BatchedBenchSpec(algorithms=("magic",)), "unknown algorithms"),
    (lambda: __import__("splitveil.experiments.bench_service", fromlist=["x"]).ServiceBenchSpec(window_seconds=0), "window_seconds must be positive"),
    (lambda: __import__("splitveil.harness.load_service", fromlist=["x"]).LoadBenchSpec(cuts=(2,)), "Λ-split needs two cuts"),
    (lambda: __import__("splitveil.harness.fuzz_service", fromlist=["x"]).FuzzBenchSpec(target="toaster"), "unknown fuzz target 'toaster'"),
    (lambda: __import__("splitveil.experiments.diffusion_privacy", fromlist=["x"]).DiffusionAttackSpec(prompts=()), "at least one prompt"),
])
def test_bench_specs(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
