"""Salted DNNs: label maps and decoding round trips for every salt, the salt layer at every position, split ==
unsplit, keyed salts."""

from __future__ import annotations

import pytest
import torch

from splitveil.core.errors import ConfigError
from splitveil.models.vision_zoo import VISION_MODELS, build_vision_model
from splitveil.plan.plan import SplitPlan, apply
from splitveil.protect.salt import (
    SaltConfig,
    SaltKey,
    SaltKind,
    decode_labels,
    decode_logits,
    parse_salt_defence,
    permutation_table,
    predict_salted,
    salt_labels,
    salt_model,
    shift_table,
)

SHAPE = (1, 12, 12)
CLASSES = 10


def tables():
    return {"shift": shift_table(CLASSES, CLASSES), "shift-more": shift_table(3 * CLASSES, CLASSES),
            "perm": permutation_table(4 * CLASSES, CLASSES, seed=3)}


@pytest.mark.parametrize("name", ["shift", "shift-more", "perm"])
def test_every_salt_round_trips(name):
    table = tables()[name]
    values = table.shape[0]
    labels = torch.arange(CLASSES).repeat(values)  # every (salt, class) pair
    salts = torch.arange(values).repeat_interleave(CLASSES)
    salted = salt_labels(labels, salts, table)
    assert ((salted >= 0) & (salted < CLASSES)).all()
    logits = torch.nn.functional.one_hot(salted, CLASSES).float()  # a perfect salted model's answer
    assert torch.equal(decode_labels(logits, salts, table), labels)
    # decoding the full logits is a permutation: the true class's logit moves to its place
    scores = torch.randn(len(labels), CLASSES)
    decoded = decode_logits(scores, salts, table)
    assert torch.equal(decoded.sort(-1).values, scores.sort(-1).values)
    assert torch.equal(decoded[torch.arange(len(labels)), labels], scores[torch.arange(len(labels)), salted])
    for row in table:  # each salt is a permutation of the classes
        assert torch.equal(row.sort().values, torch.arange(CLASSES))


def test_shift_is_the_papers_cyclic_shift():
    table = shift_table(CLASSES, CLASSES)
    y, s = torch.tensor([0, 3, 9, 7]), torch.tensor([0, 4, 1, 9])
    assert torch.equal(salt_labels(y, s, table), (y + s) % CLASSES)
    logits = torch.nn.functional.one_hot((y + s) % CLASSES, CLASSES).float()
    assert torch.equal(decode_labels(logits, s, table), (logits.argmax(-1) - s) % CLASSES)


def test_permutation_family_is_distinct_and_public():
    a, b = permutation_table(40, CLASSES, seed=1), permutation_table(40, CLASSES, seed=1)
    assert torch.equal(a, b) and len({tuple(r.tolist()) for r in a}) == 40
    with pytest.raises(ConfigError):
        permutation_table(7, 3)  # 3 classes have 6 permutations


@pytest.mark.parametrize("model_name", VISION_MODELS.names())
@pytest.mark.parametrize("kind", list(SaltKind))
def test_salted_split_equals_unsplit_at_every_position_and_cut(model_name, kind):
    torch.manual_seed(0)
    base = build_vision_model(model_name, SHAPE, CLASSES)
    for position in range(base.num_blocks):
        torch.manual_seed(position)
        model = salt_model(build_vision_model(model_name, SHAPE, CLASSES), SaltConfig(kind=kind, position=position),
                           input_shape=SHAPE, num_classes=CLASSES).eval()
        images, salts = torch.rand(5, *SHAPE), torch.randint(model.values, (5,))
        with torch.no_grad():
            unsplit = model(images, salts)
        assert unsplit.shape == (5, CLASSES)
        for cut in range(position + 1, model.num_blocks + 1):
            model.check_cut(cut)
            edge, cloud = apply(model, SplitPlan.two_way(cut))
            with torch.no_grad():
                features = edge((images, salts))
                assert isinstance(features, torch.Tensor)  # the cloud receives a plain tensor, no salt
                assert torch.equal(cloud(features), unsplit)
        with pytest.raises(ConfigError):
            model.check_cut(position)


def test_the_salt_changes_the_features_and_the_output():
    torch.manual_seed(0)
    model = salt_model(build_vision_model("vgg", SHAPE, CLASSES), SaltConfig(position=1), input_shape=SHAPE,
                       num_classes=CLASSES).eval()
    images = torch.rand(3, *SHAPE)
    a = predict_salted(model, images, torch.zeros(3, dtype=torch.int64))
    b = predict_salted(model, images, torch.ones(3, dtype=torch.int64))
    assert not torch.allclose(a, b)


def test_salt_layer_positions_out_of_range_are_refused():
    with pytest.raises(ConfigError):
        salt_model(build_vision_model("vgg", SHAPE, CLASSES), SaltConfig(position=5), input_shape=SHAPE, num_classes=CLASSES)


def test_keyed_salts_are_reproducible_per_key_and_differ_between_keys():
    a, b = SaltKey(10, key=b"k" * 32), SaltKey(10, key=b"k" * 32)
    first = a.draw(50)
    assert torch.equal(first, b.draw(50))
    assert not torch.equal(a.draw(50), first)  # the next requests get new salts
    other = SaltKey(10, key=b"x" * 32).draw(50)
    assert not torch.equal(other, first)
    assert ((first >= 0) & (first < 10)).all() and len(set(first.tolist())) > 5


def test_parse_defence():
    assert parse_salt_defence("salt") == SaltKind.CONV
    assert parse_salt_defence("salt:perm") == SaltKind.PERM
    for bad in ("noise", "salt:xyz"):
        with pytest.raises(ConfigError):
            parse_salt_defence(bad)


def test_adversarial_training_reverses_the_gradient_into_the_client():
    from splitveil.protect.salt import train_salted
    from splitveil.protect.salt_adversary import SaltAdversary, reverse_gradient

    x = torch.ones(3, requires_grad=True)
    reverse_gradient(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))
    torch.manual_seed(0)
    model = salt_model(build_vision_model("lenet", SHAPE, CLASSES), SaltConfig(position=0), input_shape=SHAPE,
                       num_classes=CLASSES)
    adversary = SaltAdversary((6, 6, 6), model.values, CLASSES, cut=1, weight=1.0)
    before = [p.clone() for p in adversary.parameters()]
    train_salted(model, torch.rand(16, *SHAPE), torch.randint(CLASSES, (16,)), epochs=1, batch_size=16,
                 adversary=adversary)
    assert any(not torch.equal(a, b) for a, b in zip(before, adversary.parameters()))  # the adversary trained too


def test_the_standard_model_is_trained_exactly_like_the_salted_one():
    """Like for like: `train_standard_like_salted` sees the same batches, in the same order, with the same
    augmentation draws and learning rates as `train_salted` with the same arguments; only the salt differs."""
    import copy

    from splitveil.protect.salt import train_salted, train_standard_like_salted

    seen = {"salted": [], "standard": []}

    def recorder(which):
        def augment(batch, generator):
            out = batch + 0.01 * torch.randn(batch.shape, generator=generator)
            seen[which].append(out.clone())
            return out
        return augment

    torch.manual_seed(0)
    base = build_vision_model("lenet", SHAPE, CLASSES)
    images, labels = torch.rand(40, *SHAPE), torch.randint(CLASSES, (40,))
    salted = salt_model(copy.deepcopy(base), SaltConfig(position=1), input_shape=SHAPE, num_classes=CLASSES)
    train_salted(salted, images, labels, epochs=2, batch_size=16, seed=5, augment=recorder("salted"))
    standard = copy.deepcopy(base)
    train_standard_like_salted(standard, images, labels, values=salted.values, epochs=2, batch_size=16, seed=5,
                               augment=recorder("standard"))
    assert len(seen["salted"]) == 6 and len(seen["standard"]) == 6  # 3 batches x 2 epochs
    assert all(torch.equal(a, b) for a, b in zip(seen["salted"], seen["standard"]))
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), standard.parameters()))  # it trained
