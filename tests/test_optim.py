import pytest
import torch

from medcap.optim import cosine_per_epoch


def lrs(scheduler_for, steps: int, group_lrs=(1e-4,)) -> list[list[float]]:
    """Each group's lr at every step 0 .. steps - 1, the scheduler stepped after each."""
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs])
    scheduler = scheduler_for(optimizer)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def torch_epochs(epochs: int, group_lrs=(1e-4,), eta_min=1e-6) -> list[list[float]]:
    return lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=eta_min), epochs,
               group_lrs)


@pytest.mark.parametrize("steps", [7, 20, 29, 44])
def test_cosine_per_epoch_with_steps_not_a_multiple_of_epochs_never_rises(steps):
    ours = [g[0] for g in lrs(lambda o: cosine_per_epoch(o, num_training_steps=steps, epochs=15, eta_min=1e-6), steps)]
    assert all(b <= a for a, b in zip(ours, ours[1:])) and min(ours) >= 1e-6
    epochs = [g[0] for g in torch_epochs(15)]
    # each step runs at one of torch's per-epoch rates, from the first epoch's to the last one's when every epoch
    # gets a step
    assert all(any(lr == pytest.approx(e, rel=1e-9) for e in epochs) for lr in ours)
    assert ours[0] == epochs[0]
    if steps >= 15:
        assert sorted(set(ours), reverse=True) == pytest.approx(epochs, rel=1e-9)


def test_cosine_per_epoch_keeps_a_zero_lr_group_at_zero():
    ours = lrs(lambda o: cosine_per_epoch(o, num_training_steps=10, epochs=5, eta_min=1e-6), 10, (0.0, 1e-4))
    assert [lr for lr, _ in ours] == [0.0] * 10
    assert [lr for _, lr in ours[::2]] == pytest.approx([g[0] for g in torch_epochs(5)], rel=1e-9)
