"""The shared training loop: run folders, determinism, exact resume, safe checkpoints."""

import json

import pytest
import torch

from learn2defend import TrainConfig, load, load_run, train
from learn2defend.checkpoint import load_state, save_state
from learn2defend.errors import UserError


def cfg(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), dataset="fake:1x8x8:4", model="smallcnn", epochs=2,
                batch_size=64, lr=0.05, val_size=1536, val_robust_n=64, progress=False,
                data_dir=str(tmp_path / "data"), attacker_width=0.125)
    base.update(kw)
    return TrainConfig(**base)



def train_crashing_at(config, step: int, monkeypatch) -> None:
    """Train `config` with its method's step raising a simulated crash at the `step`-th call
    (1-based, counted over the whole run); the real step is put back afterwards."""
    from learn2defend import methods

    real, calls = methods.STEPS[config.method], []

    def crashing(ctx, x, y):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("simulated crash")
        return real(ctx, x, y)

    monkeypatch.setitem(methods.STEPS, config.method, crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            train(config)
    finally:
        monkeypatch.setitem(methods.STEPS, config.method, real)

def weights(run):
    sd = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    if run.attacker is not None:
        sd.update({f"attacker.{k}": v for k, v in run.attacker.state_dict().items()})
    return sd


def test_run_folder_contents_and_metrics(tmp_path):
    run = train(cfg(tmp_path, method="fgsm"))
    files = {p.name for p in run.path.iterdir()}
    assert {"config.json", "last.safetensors", "best.safetensors", "metrics.jsonl"} <= files
    lines = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"train_loss", "train_acc", "attack_success", "val_clean_acc", "val_pgd10_acc", "seconds"} <= set(r)
    stored = json.loads((run.path / "config.json").read_text())
    assert stored["eps"] == 0.03 and stored["clean_weight"] == 0.5  # resolved defaults are stored


def test_deterministic_on_cpu(tmp_path):
    a = train(cfg(tmp_path, "a", method="grad-l2l"))
    b = train(cfg(tmp_path, "b", method="grad-l2l"))
    for k, v in weights(a).items():
        assert torch.equal(v, weights(b)[k]), k


@pytest.mark.parametrize("method", ["pgd", "2step-l2l"])
def test_resume_mid_run_is_exact(tmp_path, method):
    full = train(cfg(tmp_path, "full", method=method, epochs=3))
    # stop after one epoch, then continue to three with the same folder
    train(cfg(tmp_path, "part", method=method, epochs=1))
    resumed = train(cfg(tmp_path, "part", method=method, epochs=3), resume=True)
    assert resumed.epoch == 3
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_resume_from_mid_epoch_checkpoint_is_exact(tmp_path, monkeypatch):
    full = train(cfg(tmp_path, "full", method="grad-l2l", epochs=2, checkpoint_every=4))
    # crash in the middle of epoch 2 (8 batches per epoch); the last checkpoint is then 4 batches into it
    train_crashing_at(cfg(tmp_path, "part", method="grad-l2l", epochs=2, checkpoint_every=4), 8 + 7, monkeypatch)
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 4)
    resumed = train(cfg(tmp_path, "part", method="grad-l2l", epochs=2, checkpoint_every=4), resume=True)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_load_returns_plain_module(tmp_path):
    train(cfg(tmp_path, method="plain"))
    model = load(tmp_path / "run")
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 4)


def test_l2l_run_saves_attacker_and_both_optimizers(tmp_path):
    run = train(cfg(tmp_path, method="2step-l2l", epochs=1))
    state = load_state(run.path / "last.safetensors")
    expected = {"model", "attacker", "optimizer", "attacker_optimizer", "scheduler", "attacker_scheduler", "rng"}
    assert expected <= set(state)
    assert run.attacker is not None
    assert state["optimizer"]["state"]  # momentum buffers are really there
    assert isinstance(next(iter(state["optimizer"]["state"])), int)  # int keys survive the codec


def test_existing_folder_needs_resume_or_overwrite(tmp_path):
    train(cfg(tmp_path, epochs=1))
    with pytest.raises(UserError, match="--resume"):
        train(cfg(tmp_path, epochs=1))
    run = train(cfg(tmp_path, epochs=1, lr=0.01), overwrite=True)
    assert json.loads((run.path / "config.json").read_text())["lr"] == 0.01


def test_a_run_folder_in_use_is_refused_and_left_alone(tmp_path):
    import fcntl
    import os

    from learn2defend.runs import RunFolderBusy

    run = train(cfg(tmp_path, epochs=1))
    before = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}
    fd = os.open(run.path, os.O_RDONLY)  # another process training into it holds this lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RunFolderBusy, match="another process"):
            train(cfg(tmp_path, epochs=2), resume=True)
        with pytest.raises(RunFolderBusy):
            train(cfg(tmp_path, epochs=1), overwrite=True)
    finally:
        os.close(fd)
    assert {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()} == before
    assert train(cfg(tmp_path, epochs=2), resume=True).epoch == 2  # free again


def test_resume_refuses_changed_settings(tmp_path):
    train(cfg(tmp_path, epochs=1))
    with pytest.raises(UserError, match="lr"):
        train(cfg(tmp_path, epochs=2, lr=0.5), resume=True)


def test_init_from_plain_run(tmp_path):
    plain = train(cfg(tmp_path, "plain", epochs=1))
    adv = train(cfg(tmp_path, "adv", method="fgsm", epochs=1, init=str(tmp_path / "plain")))
    assert adv.history[0]["val_clean_acc"] >= 0.0
    with pytest.raises(UserError, match="cannot start"):
        train(cfg(tmp_path, "bad", model="wrn-16-4", epochs=1, init=str(plain.path)))


def test_checkpoint_codec_round_trip(tmp_path):
    state = {"a": torch.arange(3), "b": {0: (1, 2.5, None), "x": [torch.ones(2), "s"]}, "c": float("inf")}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert torch.equal(back["a"], state["a"]) and back["b"][0] == (1, 2.5, None)
    assert torch.equal(back["b"]["x"][0], torch.ones(2)) and back["c"] == float("inf")


def test_corrupt_and_foreign_checkpoints_are_user_errors(tmp_path):
    run = train(cfg(tmp_path, epochs=1))
    last = run.path / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_run(run.path)
    torch.save({"x": 1}, last)  # a pickle is never unpickled
    with pytest.raises(UserError):
        load_run(run.path)


def test_old_attacker_layout_is_refused(tmp_path):
    run = train(cfg(tmp_path, method="grad-l2l", epochs=1, val_robust_n=0))
    path = run.path / "last.safetensors"
    state = load_state(path)
    assert state["attacker_layout"] == 2
    del state["attacker_layout"]  # as written before layout 2
    save_state(path, state)
    with pytest.raises(UserError, match="attacker in .* has layout 1, written by an older learn2defend"):
        load_run(run.path)
    with pytest.raises(UserError, match="has layout 1"):
        train(cfg(tmp_path, method="grad-l2l", epochs=2, val_robust_n=0), resume=True)
    # the classifier alone still loads, and can be evaluated
    assert load(run.path)(torch.rand(2, 1, 8, 8)).shape == (2, 4)


def test_smallcnn_on_large_images_gets_one_line_of_advice(tmp_path, capsys):
    from learn2defend.reporting import SMALLCNN_ADVICE

    train(cfg(tmp_path, "small", epochs=1, val_robust_n=0, method="plain"))
    assert SMALLCNN_ADVICE not in capsys.readouterr().err  # 8x8 digits: what smallcnn is for
    train(cfg(tmp_path, "large", epochs=1, val_robust_n=0, method="plain", dataset="fake:1x20x20:4"))
    assert SMALLCNN_ADVICE in capsys.readouterr().err
