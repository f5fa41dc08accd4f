"""FGSM-PGI (`--method fgsm-pgi`) and its per-image memory: the step on a tiny model, the rows
it reads and writes, the ball and [0, 1], bit-exact resume mid-epoch, and two gloo ranks."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train import train_crashing_at

from learn2defend import TrainConfig, train
from learn2defend.checkpoint import load_state
from learn2defend.data import DeviceLoader, ImageData
from learn2defend.errors import UserError
from learn2defend.memory import PerturbationMemory
from learn2defend.methods import METHOD_RECORDS, fgsm_pgi_step, pgi_epoch_start
from learn2defend.train import build_parts

META = {"image_shape": [1, 8, 8], "classes": ["0", "1", "2", "3"], "mean": [0.5], "std": [0.25]}


def _context(norm="linf", eps=0.1, n=10, **kw):
    cfg = TrainConfig(method="fgsm-pgi", eps=eps, norm=norm, lr=0.05, **kw).resolve()
    ctx = build_parts(cfg, META, torch.device("cpu")).ctx
    ctx.model.train()
    ctx.memory = PerturbationMemory(n, (1, 8, 8), "cpu")
    pgi_epoch_start(ctx, 0)
    return ctx


def _recording(ctx):
    """Record the classifier's inputs: the first forward of a step is the start, the second the training point."""
    seen, model = [], ctx.model

    def forward(x):
        seen.append(x.detach().clone())
        return model(x)
    ctx.model = forward
    return seen


def test_record_defaults_and_cost():
    cfg = TrainConfig(method="fgsm-pgi", eps=0.1).resolve()
    a = cfg.attack
    assert (a.step_size, cfg.loss.pgi_lambda, a.pgi_decay, a.pgi_reset) == (0.1, 10.0, 0.3, 40)
    assert METHOD_RECORDS["fgsm-pgi"].forwards(cfg) == (7.0, 0.0)
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d).resolve() == cfg and d["pgi_reset"] == 40
    assert "pgi_lambda" not in TrainConfig(method="n-fgsm").resolve().to_dict()
    with pytest.raises(UserError, match="--pgi-decay applies to --method fgsm-pgi only"):
        TrainConfig(method="fgsm", pgi_decay=0.5).validate()
    with pytest.raises(UserError, match="--pgi-reset"):
        TrainConfig(method="fgsm-pgi", pgi_reset=0).validate()


def test_step_reads_and_writes_only_the_batchs_rows():
    torch.manual_seed(0)
    ctx = _context()
    before_delta, before_momentum = ctx.memory.delta.clone(), ctx.memory.momentum.clone()
    assert torch.equal(before_delta.abs(), torch.full_like(before_delta, 0.1))  # random corners, momentum 0
    assert not before_momentum.any()
    x, y = torch.rand(3, 1, 8, 8) * 0.8 + 0.1, torch.tensor([0, 1, 2])  # away from the box: no clipping
    ctx.indices = torch.tensor([2, 5, 7])
    seen = _recording(ctx)
    metrics = fgsm_pgi_step(ctx, x, y)
    assert all(torch.isfinite(v).all() for v in metrics.values()) and metrics["loss"] > 0
    # the start is the remembered perturbation of exactly those rows
    torch.testing.assert_close(seen[0], x + before_delta[[2, 5, 7]])
    others = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.equal(ctx.memory.delta[others], before_delta[others])
    assert torch.equal(ctx.memory.momentum[others], before_momentum[others])
    assert ctx.memory.momentum[[2, 5, 7]].abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert not torch.equal(ctx.memory.delta[[2, 5, 7]], before_delta[[2, 5, 7]])  # the corner moved somewhere
    # momentum of the first visit: the batch's gradient over its L1 norm, summing to 1 in absolute value
    assert ctx.memory.momentum[[2, 5, 7]].abs().sum().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.0)])
def test_start_training_point_and_memory_stay_in_the_ball_and_the_box(norm, eps):
    torch.manual_seed(1)
    ctx = _context(norm, eps, n=8)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    x[:, :, :2] = 0.0  # pixels at the box's edges: the projections must clip
    x[:, :, -2:] = 1.0
    ctx.indices, model = torch.arange(8), ctx.model
    for _ in range(3):  # later visits start from what the earlier ones wrote
        ctx.model = model
        seen = _recording(ctx)
        fgsm_pgi_step(ctx, x, y)
        for point in (*seen, x + ctx.memory.delta):
            d = (point - x).flatten(1)
            norms = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
            assert norms.max() <= eps * (1 + 1e-5) + 1e-6
            assert point.min() >= 0 and point.max() <= 1
        assert len(seen) == 2


def test_without_a_loop_the_batch_is_the_whole_set():
    cfg = TrainConfig(method="fgsm-pgi", eps=0.1, lr=0.05).resolve()
    parts = build_parts(cfg, META, torch.device("cpu"))
    step = parts.step(cfg, torch.device("cpu"))
    step(torch.rand(4, 1, 8, 8), torch.arange(4))
    assert len(parts.ctx.memory) == 4 and parts.ctx.memory.momentum.any()


def test_loader_yields_each_batchs_indices_on_request():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    loader = DeviceLoader(ImageData(images, torch.arange(20)), 6, "cpu", seed=3)
    loader.set_epoch(1)
    plain = list(loader.iterate(1))
    with_idx = list(loader.iterate(1, indices=True))
    assert all(len(b) == 2 for b in plain) and all(len(b) == 3 for b in with_idx)
    for (x, y), (x2, y2, idx) in zip(plain, with_idx, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(idx, y)  # label i is image i


def _cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), dataset="fake:1x8x8:4", train_size=256, val_size=64, model="smallcnn",
                method="fgsm-pgi", epochs=2, batch_size=32, lr=0.05, val_robust_n=0, progress=False,
                data_dir=str(tmp_path / "data"), checkpoint_every=3, pgi_reset=1)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_mid_epoch_is_bit_exact_and_the_memory_is_in_last(tmp_path, monkeypatch):
    # --pgi-reset 1 resets at each epoch's start: a resume mid-epoch must not, and must take the
    # memory from the checkpoint (8 batches per epoch; the crash 6 batches into epoch 2)
    full = train(_cfg(tmp_path, "full"))
    train_crashing_at(_cfg(tmp_path, "part"), 8 + 6, monkeypatch)
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 3)
    assert state["memory"]["delta"].shape == (256, 1, 8, 8) and state["memory"]["momentum"].any()
    assert "memory" not in load_state(tmp_path / "part" / "best.safetensors")
    resumed = train(_cfg(tmp_path, "part"), resume=True)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    a, b = (load_state(r.path / "last.safetensors")["memory"] for r in (full, resumed))
    assert torch.equal(a["delta"], b["delta"]) and torch.equal(a["momentum"], b["momentum"])


def test_memory_too_large_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARN2DEFEND_MEMORY_LIMIT", "1000")
    with pytest.raises(UserError, match="per-image memory of 2 x 256 x 1 x 8 x 8 floats"):
        train(_cfg(tmp_path, "big"))


# ---- two gloo ranks ------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from learn2defend import TrainConfig, distributed, methods, train
    from learn2defend.models import Normalize, register_model

    @register_model("test-mlp")
    def _mlp(*, num_classes, in_channels, image_size, mean, std):
        return nn.Sequential(Normalize(mean, std), nn.Flatten(),
                             nn.Linear(in_channels * image_size ** 2, 32), nn.ReLU(), nn.Linear(32, num_classes))

    out = sys.argv[1]
    real, record = methods.STEPS["fgsm-pgi"], {"indices": []}

    def step(ctx, x, y):
        if not record["indices"]:
            record["start"] = ctx.memory.delta.clone()
        record["indices"].append(ctx.indices.clone())
        result = real(ctx, x, y)
        record["before_merge"], record["ctx"] = ctx.memory.delta.clone(), ctx
        return result

    methods.STEPS["fgsm-pgi"] = step
    distributed.init_from_env("cpu")
    train(TrainConfig(out=out, dataset="fake:1x8x8:4", train_size=192, val_size=64, model="test-mlp",
                      method="fgsm-pgi", epochs=1, batch_size=16, lr=0.05, val_robust_n=0, progress=False,
                      device="cpu", data_dir=out + "-data"))
    torch.save({"start": record["start"], "indices": torch.cat(record["indices"]),
                "before_merge": record["before_merge"], "after_merge": record["ctx"].memory.delta.clone(),
                "momentum": record["ctx"].memory.momentum.clone()},
               f"{out}/memory-rank{distributed.rank()}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_ranks_keep_their_own_rows_and_merge_them_at_the_epochs_end(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{_free_port()}", str(script), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(out / f"memory-rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["start"], r1["start"])  # the same start on every rank
    mine0, mine1 = r0["indices"], r1["indices"]
    assert len(mine0) == len(mine1) == 96 and not set(mine0.tolist()) & set(mine1.tolist())
    for me, other in ((r0, mine1), (r1, mine0)):
        mine = me["indices"]
        # before the merge a rank has written its own rows and no other
        assert torch.equal(me["before_merge"][other], me["start"][other])
        assert not torch.equal(me["before_merge"][mine], me["start"][mine])
    # after it every rank holds every row as the rank that trained on the image left it
    assert torch.equal(r0["after_merge"], r1["after_merge"]) and torch.equal(r0["momentum"], r1["momentum"])
    assert torch.equal(r0["after_merge"][mine0], r0["before_merge"][mine0])
    assert torch.equal(r0["after_merge"][mine1], r1["before_merge"][mine1])
    saved = load_state(out / "last.safetensors")["memory"]
    assert torch.equal(saved["delta"], r0["after_merge"])


def test_stream_loader_yields_each_batchs_indices_on_request(tmp_path):
    from PIL import Image

    from learn2defend.data.stream import FileData, StreamLoader

    paths = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    loader = StreamLoader(FileData(paths, torch.arange(6), 8), 2, "cpu", workers=0, seed=1)
    batches = list(loader.iterate(1, indices=True))
    assert len(batches) == 2
    for x, y, idx in batches:
        assert torch.equal(idx, y) and torch.equal((x[:, 0, 0, 0] * 255).round().long(), 40 * y)


def test_cli_lists_it_refuses_bad_options_in_one_line_and_bench_times_it(tmp_path, capsys):
    import json

    from learn2defend.cli import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "fgsm-pgi" in out and "--pgi-lambda" in out and "--pgi-decay" in out and "--pgi-reset" in out
    for flags, message in ((["--method", "fgsm-pgi", "--pgi-decay", "2"], "--pgi-decay must lie in [0, 1]"),
                           (["--method", "fgsm-pgi", "--pgi-lambda", "-1"], "--pgi-lambda must lie"),
                           (["--method", "pgd-at", "--pgi-reset", "5"], "--pgi-reset applies to --method fgsm-pgi")):
        assert main(["train", *flags, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()
    assert main(["bench", "--model", "smallcnn", "--dataset", "fake:1x8x8:4", "--batch-size", "8", "--steps", "1",
                 "--warmup", "0", "--device", "cpu", "--methods", "n-fgsm,fgsm-pgi", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seconds_per_step"]["fgsm-pgi"] > 0
    macs = result["macs_per_step"]
    assert macs["fgsm-pgi"] == pytest.approx(7 / 5 * macs["n-fgsm"], rel=0.02)  # 7 forwards against 5


RESUME_WORKER = textwrap.dedent("""
    import os
    import signal
    import sys
    import torch
    from torch import nn
    from learn2defend import TrainConfig, distributed, methods, train
    from learn2defend.guards import TrainingInterrupted
    from learn2defend.models import Normalize, register_model

    @register_model("test-mlp")
    def _mlp(*, num_classes, in_channels, image_size, mean, std):
        return nn.Sequential(Normalize(mean, std), nn.Flatten(),
                             nn.Linear(in_channels * image_size ** 2, 32), nn.ReLU(), nn.Linear(32, num_classes))

    out, resume, stop_at = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
    real, seen = methods.STEPS["fgsm-pgi"], []

    def step(ctx, x, y):  # SIGTERM to rank 0 alone at step stop_at
        seen.append(ctx)
        if len(seen) == stop_at and distributed.rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ctx, x, y)

    methods.STEPS["fgsm-pgi"] = step
    distributed.init_from_env("cpu")
    try:
        run = train(TrainConfig(out=out, dataset="fake:1x8x8:4", train_size=192, val_size=64, model="test-mlp",
                                method="fgsm-pgi", epochs=2, batch_size=16, lr=0.05, val_robust_n=0, progress=False,
                                device="cpu", data_dir=out + "-data", checkpoint_every=2), resume=resume)
    except TrainingInterrupted:
        sys.exit(0)
    state = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    state.update({f"memory.{k}": v.clone() for k, v in seen[-1].memory.state_dict().items()})
    torch.save(state, f"{out}/final-rank{distributed.rank()}.pt")
""")


def _torchrun(tmp_path, worker, *args):
    script = tmp_path / "resume_worker.py"
    script.write_text(worker)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{_free_port()}", str(script), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_resume_mid_epoch_bit_exact(tmp_path):
    # 6 batches per rank and epoch; SIGTERM on rank 0 at its 6 + 3rd step: both ranks stop at the
    # checkpoint after batch 4 of epoch 2, with the rows both wrote in it merged into LAST
    _torchrun(tmp_path, RESUME_WORKER, tmp_path / "full", "new", 0)
    _torchrun(tmp_path, RESUME_WORKER, tmp_path / "part", "new", 6 + 3)
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"], state["world_size"]) == (1, 4, 2)
    _torchrun(tmp_path, RESUME_WORKER, tmp_path / "part", "resume", 0)
    for rank in (0, 1):
        full, resumed = (torch.load(tmp_path / name / f"final-rank{rank}.pt") for name in ("full", "part"))
        assert full.keys() == resumed.keys() and any(k.startswith("memory.") for k in full)
        for k in full:
            assert torch.equal(full[k], resumed[k]), (rank, k)
