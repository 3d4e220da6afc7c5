"""The early stopper every learned attack trains with: it stops on a plateau (converged), at the cap (not converged),
restores the best epoch's weights, lowers the learning rate on a stall, and holds out part of the attacker's data."""

import math

import pytest
import torch
from torch import nn

from splitveil.attack.training import (Convergence, StopRule, combined_record, holdout_split, mean_over_batches,
                                       shuffled_batches, train_until_plateau)
from splitveil.core.errors import ConfigError


def _scripted(losses):
    """A module whose weight is set to the epoch number each epoch, and a held-out loss read from `losses`."""
    module = nn.Linear(1, 1, bias=False)
    epochs = []

    def run_epoch(epoch):
        epochs.append(epoch)
        with torch.no_grad():
            module.weight.fill_(epoch + 1)  # 1-based, like Convergence.best_epoch

    return module, run_epoch, lambda: losses[len(epochs) - 1], epochs


def test_it_stops_on_a_plateau_reports_converged_and_restores_the_best_weights():
    losses = [5.0, 4.0, 3.0, 2.0, 2.5, 2.4, 2.6, 1.0, 0.5]  # best at epoch 4, then 3 epochs without improvement
    module, run_epoch, held_out, epochs = _scripted(losses)
    result = train_until_plateau(run_epoch, held_out, modules=[module], rule=StopRule(patience=3, max_epochs=50))
    assert result.converged and result.epochs == 7 and epochs == list(range(7))  # never saw the later fall
    assert result.best_epoch == 4 and result.val_loss == 2.0 and result.history == tuple(losses[:7])
    assert module.weight.item() == 4.0  # the best epoch's weights, not the last epoch's (7)
    assert not module.training


def test_it_stops_at_the_cap_and_reports_not_converged():
    losses = [1.0 / (epoch + 1) for epoch in range(10)]  # still falling when the cap stops it
    module, run_epoch, held_out, _ = _scripted(losses)
    result = train_until_plateau(run_epoch, held_out, modules=[module], rule=StopRule(patience=3, max_epochs=6))
    assert not result.converged and result.epochs == 6 and result.best_epoch == 6
    assert module.weight.item() == 6.0
    assert result.record() == {"attacker_epochs": 6, "attacker_val_loss": pytest.approx(1 / 6),
                               "attacker_converged": False, "attacker_best_epoch": 6}


def test_falls_smaller_than_min_delta_make_a_plateau_but_keep_the_lowest_weights():
    losses = [1.0, 0.9995, 0.999, 0.9985, 0.998, 0.9]  # 0.05% per epoch: below a 1% min_delta
    module, run_epoch, held_out, _ = _scripted(losses)
    result = train_until_plateau(run_epoch, held_out, modules=[module],
                                 rule=StopRule(patience=4, min_delta=0.01, max_epochs=50))
    assert result.converged and result.epochs == 5
    assert result.best_epoch == 5 and module.weight.item() == 5.0


def test_a_diverged_epoch_never_counts_as_the_best():
    module, run_epoch, held_out, _ = _scripted([2.0, math.nan, math.inf, 3.0])
    result = train_until_plateau(run_epoch, held_out, modules=[module], rule=StopRule(patience=3, max_epochs=50))
    assert result.converged and result.best_epoch == 1 and module.weight.item() == 1.0


def test_the_learning_rate_falls_after_lr_patience_epochs_without_improvement():
    module, run_epoch, held_out, _ = _scripted([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    optimiser = torch.optim.SGD(module.parameters(), lr=0.8)
    result = train_until_plateau(run_epoch, held_out, modules=[module], optimisers=[optimiser],
                                 rule=StopRule(patience=6, lr_patience=2, lr_factor=0.5, max_epochs=50))
    assert result.epochs == 7  # stale after epochs 2..7; halved at stale 2 and 4 (not after the stopping epoch)
    assert optimiser.param_groups[0]["lr"] == pytest.approx(0.2)


def test_a_real_fit_converges_and_beats_its_first_epoch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(400, 1, generator=generator)
    train, held = holdout_split(len(x), 0.25, seed=0)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)

    def run_epoch(epoch):
        for batch in shuffled_batches(len(train), 32, generator):
            loss = nn.functional.mse_loss(model(x[train[batch]]), y[train[batch]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    def held_out():
        return mean_over_batches(lambda i: nn.functional.mse_loss(model(x[held[i]]), y[held[i]]), len(held), batch_size=32)

    result = train_until_plateau(run_epoch, held_out, modules=[model], optimisers=[optimiser],
                                 rule=StopRule(patience=5, max_epochs=300))
    assert result.converged and result.epochs < 300
    assert result.val_loss < 0.02 < result.history[0]  # the noise floor is 0.01
    assert held_out() == pytest.approx(result.val_loss)  # the restored weights are the ones that scored it


def test_holdout_split_is_disjoint_seeded_and_never_empty():
    train, held = holdout_split(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(torch.cat([train, held]).tolist()) == list(range(100))
    assert torch.equal(held, holdout_split(100, 0.1, seed=3)[1])
    assert not torch.equal(held, holdout_split(100, 0.1, seed=4)[1])
    assert [len(part) for part in holdout_split(3, 0.1, seed=0)] == [2, 1]
    with pytest.raises(ConfigError, match="at least 2"):
        holdout_split(1, 0.1, seed=0)


def test_mean_over_batches_weights_by_batch_size():
    values = torch.arange(10.0)
    assert mean_over_batches(lambda i: values[i].mean(), 10, batch_size=4) == pytest.approx(4.5)


@pytest.mark.parametrize("fields", [{"max_epochs": 0}, {"patience": 0}, {"holdout": 1.0}, {"min_delta": -0.1},
                                    {"lr_factor": 0.0}, {"min_epochs": 5, "max_epochs": 4}])
def test_a_bad_stop_rule_fails_with_one_line(fields):
    with pytest.raises(ConfigError, match="bad stop rule"):
        StopRule(**fields)


def test_stop_rule_round_trips_and_rejects_unknown_fields():
    rule = StopRule(patience=7)
    assert StopRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ConfigError, match="unknown stop-rule field"):
        StopRule.from_dict({"epochs": 3})


def test_phases_combine_into_one_record():
    edge = Convergence(epochs=12, best_epoch=2, val_loss=0.5, converged=True, history=(0.6, 0.5), seconds=3.0)
    decoder = Convergence(epochs=30, best_epoch=20, val_loss=0.02, converged=False, history=())
    record = combined_record({"substitute": edge, "decoder": decoder})
    assert record["attacker_epochs"] == 42 and record["attacker_val_loss"] == 0.02
    assert record["attacker_converged"] is False  # one phase stopped at its cap
    assert record["attacker_phases"]["substitute"] == {"epochs": 12, "val_loss": 0.5, "converged": True, "best_epoch": 2,
                                                       "val_loss_history": [0.6, 0.5], "seconds": 3.0}
    assert combined_record({}) == {}
