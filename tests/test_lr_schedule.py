"""--lr-schedule: multistep per epoch, cosine and onecycle per batch, exact on resume."""

import json

import numpy as np
import pytest
import torch

from learn2defend import TrainConfig, train
from learn2defend.checkpoint import load_state
from learn2defend.cli import main
from learn2defend.errors import UserError
from learn2defend.optim import schedule
from learn2defend.settings import OptimizerSettings

BATCHES = 8  # fake:1x8x8:4 with val_size 1536 leaves 512 training images: 8 batches of 64


def cfg(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), dataset="fake:1x8x8:4", model="smallcnn", epochs=2, batch_size=64,
                lr=0.05, val_size=1536, val_robust_n=0, progress=False, data_dir=str(tmp_path / "data"),
                attacker_width=0.125, method="fgsm")
    base.update(kw)
    return TrainConfig(**base)


def settings(kind: str, lr: float = 0.2, milestones=()) -> OptimizerSettings:
    return OptimizerSettings("sgd", lr, 0.9, 0.0, (0.9, 0.99), tuple(milestones), 0.1, kind)


def rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The rate of each of `steps` steps, the scheduler stepped after each."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()  # no gradients: nothing moves, but the order is a training loop's
        scheduler.step()
    return out


def sgd(lr: float = 0.2) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr, momentum=0.9)


def test_each_schedule_is_torchs_own_scheduler():
    total = 50
    ours = rates(schedule(sgd(), settings("multistep", milestones=(10, 30))), total)
    assert ours == rates(torch.optim.lr_scheduler.MultiStepLR(sgd(), [10, 30], 0.1), total)
    assert ours[9] == 0.2 and ours[10] == pytest.approx(0.02) and ours[30] == pytest.approx(0.002)
    ours = rates(schedule(sgd(), settings("cosine"), total), total)
    assert ours == rates(torch.optim.lr_scheduler.CosineAnnealingLR(sgd(), T_max=total), total)
    closed = [0.1 * (1 + np.cos(np.pi * t / total)) for t in range(total)]
    assert ours == pytest.approx(closed, abs=1e-9)
    ours = rates(schedule(sgd(), settings("onecycle"), total), total)
    reference = torch.optim.lr_scheduler.OneCycleLR(sgd(), max_lr=0.2, total_steps=total, pct_start=0.4,
                                                    anneal_strategy="linear", cycle_momentum=False, div_factor=20)
    assert ours == rates(reference, total)
    # the cyclic schedule of Wong et al. 2020: np.interp over [0, 2/5, 1] of the run, read after each batch
    wong = [np.interp((t + 1) / total, [0, 0.4, 1], [0, 0.2, 0]) for t in range(total)]
    assert ours == pytest.approx(wong, abs=1e-5)
    assert max(ours) == pytest.approx(0.2) and ours.index(max(ours)) == 19  # the peak at 2/5


def test_onecycle_keeps_the_momentum_and_needs_the_run_length():
    optimizer = sgd()
    scheduler = schedule(optimizer, settings("onecycle"), 10)
    rates(scheduler, 10)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="total steps"):
        schedule(sgd(), settings("cosine"))


def record_rates(monkeypatch, method: str) -> list[float]:
    """The classifier's learning rate at each training step of `method`."""
    from learn2defend import methods

    real, seen = methods.STEPS[method], []

    def step(ctx, x, y):
        seen.append(ctx.optimizer.param_groups[0]["lr"])
        return real(ctx, x, y)

    monkeypatch.setitem(methods.STEPS, method, step)
    return seen


@pytest.mark.parametrize("kind", ["cosine", "onecycle"])
def test_per_batch_schedules_step_once_per_batch(tmp_path, monkeypatch, kind):
    seen = record_rates(monkeypatch, "fgsm")
    run = train(cfg(tmp_path, lr_schedule=kind))
    total = 2 * BATCHES
    assert seen == rates(schedule(sgd(0.05), settings(kind, lr=0.05), total), total)
    assert len(set(seen)) > BATCHES  # not one rate per epoch
    assert [r["lr"] for r in run.history] == [seen[BATCHES - 1], seen[-1]]  # each epoch's last batch's rate
    state = load_state(run.path / "last.safetensors")
    assert state["scheduler"]["last_epoch"] == total - 1  # never past the last step
    assert json.loads((run.path / "config.json").read_text())["lr_schedule"] == kind


def test_multistep_steps_per_epoch_and_the_attacker_keeps_its_schedule(tmp_path, monkeypatch):
    seen = record_rates(monkeypatch, "grad-l2l")
    run = train(cfg(tmp_path, method="grad-l2l", epochs=3, lr_milestones=[1], attacker_optimizer="sgd",
                    attacker_lr_milestones=[2]))
    assert seen == [0.05] * BATCHES + [pytest.approx(0.005)] * 2 * BATCHES
    state = load_state(run.path / "last.safetensors")
    assert state["attacker_scheduler"]["milestones"] == {2: 1}
    seen.clear()
    run = train(cfg(tmp_path, "cyc", method="grad-l2l", epochs=3, lr_schedule="onecycle", attacker_optimizer="sgd",
                    attacker_lr_milestones=[2]))
    assert len(set(seen)) > 2 * BATCHES  # per batch, not per epoch
    state = load_state(run.path / "last.safetensors")
    assert state["attacker_scheduler"]["last_epoch"] == 3  # per epoch, multistep, whatever --lr-schedule says
    assert state["attacker_optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize(("kind", "method"), [("onecycle", "grad-l2l"), ("cosine", "fgsm")])
def test_mid_epoch_resume_is_bit_exact(tmp_path, monkeypatch, kind, method):
    from learn2defend import methods

    seen = record_rates(monkeypatch, method)
    full = train(cfg(tmp_path, "full", method=method, lr_schedule=kind, checkpoint_every=3))
    full_rates = list(seen)
    seen.clear()
    recording, calls = methods.STEPS[method], []

    def crashing(ctx, x, y):
        calls.append(1)
        if len(calls) == BATCHES + 5:  # in epoch 2, after its checkpoint at batch 3
            raise RuntimeError("simulated crash")
        return recording(ctx, x, y)

    monkeypatch.setitem(methods.STEPS, method, crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg(tmp_path, "part", method=method, lr_schedule=kind, checkpoint_every=3))
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 3)
    monkeypatch.setitem(methods.STEPS, method, recording)
    before = len(seen)
    resumed = train(cfg(tmp_path, "part", method=method, lr_schedule=kind, checkpoint_every=3), resume=True)
    assert seen[:BATCHES + 3] + seen[before:] == full_rates  # the schedule went on where it stopped
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.attacker.state_dict().items() if full.attacker is not None else ():
        assert torch.equal(v, resumed.attacker.state_dict()[k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    assert [r["lr"] for r in full.history] == [r["lr"] for r in resumed.history]


def test_a_per_batch_schedule_cannot_be_extended_on_resume(tmp_path):
    train(cfg(tmp_path, epochs=1, lr_schedule="onecycle"))
    with pytest.raises(UserError, match="spans the run's 1 epochs"):
        train(cfg(tmp_path, epochs=2, lr_schedule="onecycle"), resume=True)
    train(cfg(tmp_path, "multi", epochs=1))
    assert train(cfg(tmp_path, "multi", epochs=2), resume=True).epoch == 2  # multistep may be


def test_old_configs_read_as_multistep_and_the_choice_is_recorded(tmp_path):
    old = cfg(tmp_path).to_dict()
    del old["lr_schedule"]
    assert TrainConfig.from_dict(old).resolve().optimizer.schedule == "multistep"
    resolved = cfg(tmp_path, lr_schedule="cosine").resolve()
    assert resolved.to_dict()["lr_schedule"] == "cosine"
    assert TrainConfig.from_dict(resolved.to_dict()).resolve() == resolved
    assert resolved.attacker is None
    l2l = cfg(tmp_path, method="grad-l2l", lr_schedule="onecycle", attacker_optimizer="sgd").resolve()
    assert l2l.attacker.optimizer.schedule == "multistep"


@pytest.mark.parametrize(("flags", "words"), [
    (["--lr-schedule", "cyclic"], "unknown lr-schedule 'cyclic'; choose one of: multistep, cosine, onecycle"),
    (["--lr-schedule", "cosine", "--lr-milestones", "1"], "--lr-milestones applies to --lr-schedule multistep only"),
])
def test_bad_schedules_exit_2_with_one_line(tmp_path, capsys, flags, words):
    code = main(["train", "--out", str(tmp_path / "bad"), "--dataset", "fake:1x8x8:4", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "bad").exists()
