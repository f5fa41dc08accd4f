"""Training under torchrun (2 gloo processes on the CPU): both ranks end with identical
classifier and attacker, equal (up to float rounding) to one process on the same global
batches; resume with another number of processes; commands that refuse to run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from learn2defend.checkpoint import load_state

# A BN-free classifier and attacker: with batch norm, per-rank batch statistics would
# (rightly) differ from those of one process on the global batch.
WORKER = textwrap.dedent("""
    import os
    import signal
    import sys
    import torch
    from torch import nn
    from learn2defend import TrainConfig, distributed, methods, train
    from learn2defend.guards import TrainingInterrupted
    train_module = sys.modules["learn2defend.train"]  # the module; learn2defend.train is the function
    from learn2defend.models import Normalize, register_model

    @register_model("test-mlp")
    def _mlp(*, num_classes, in_channels, image_size, mean, std):
        return nn.Sequential(Normalize(mean, std), nn.Flatten(),
                             nn.Linear(in_channels * image_size ** 2, 32), nn.ReLU(), nn.Linear(32, num_classes))

    class Attacker(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        def forward(self, a, eps):
            return eps * torch.tanh(self.conv(a))

    def build_attacker(cfg, meta):
        return Attacker(2 * meta["image_shape"][0], meta["image_shape"][0])

    train_module.build_attacker = build_attacker  # training builds it,
    sys.modules["learn2defend.runs"].build_attacker = build_attacker  # loading the run too
    out, batch, epochs, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "resume"
    stop_at, seen = int(sys.argv[5]), []
    real_step = methods.STEPS["grad-l2l"]

    def step(ctx, x, y):  # SIGTERM to rank 0 alone at step stop_at
        seen.append(ctx)
        if len(seen) == stop_at and distributed.rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(ctx, x, y)

    methods.STEPS["grad-l2l"] = step
    distributed.init_from_env("cpu")
    try:
        run = train(TrainConfig(out=out, dataset="fake:1x8x8:4", train_size=192, val_size=64, model="test-mlp",
                                method="grad-l2l", epochs=epochs, batch_size=batch, lr=0.05, momentum=0.9,
                                val_robust_n=0, progress=False, device="cpu", checkpoint_every=2,
                                data_dir=out + "-data"), resume=resume)
        model, attacker = run.model, run.attacker
    except TrainingInterrupted:
        model, attacker = seen[-1].model, seen[-1].attacker
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    weights.update({f"attacker.{k}": v for k, v in attacker.state_dict().items()})
    torch.save(weights, f"{out}/weights-rank{distributed.rank()}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(tmp_path, out, batch, epochs, procs, resume=False, stop_at=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(tmp_path / out), str(batch), str(epochs), "resume" if resume else "new", str(stop_at)]
    if procs == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=localhost:{_free_port()}", str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / out / f"weights-rank{r}.pt") for r in range(procs)]


def _assert_close(a, b, exact=False):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    # 2 processes x 16 images, SIGTERM on rank 0 alone 3 batches into epoch 2: both stop at the
    # next step where the ranks agree on stopping (here the periodic checkpoint after batch 4)
    rank0, rank1 = _run(tmp_path, "two", batch=16, epochs=2, procs=2, stop_at=6 + 3)
    _assert_close(rank0, rank1, exact=True)  # the ranks never drift apart
    state = load_state(tmp_path / "two" / "last.safetensors")
    assert (state["epoch"], state["batch"], state["world_size"], state["sums"]["n"]) == (1, 4, 2, 128)

    (single,) = _run(tmp_path, "one", batch=32, epochs=2, procs=1)
    # continued as one process with the same global batch (1 x 32): as if it had been one
    # process all along, 2 x 16 images per step = one process with 32
    (resumed,) = _run(tmp_path, "two", batch=32, epochs=2, procs=1, resume=True)
    _assert_close(resumed, single)
    two, one = (_history(tmp_path / name) for name in ("two", "one"))
    for a, b in zip(two, one, strict=True):
        assert a["train_acc"] == b["train_acc"] and abs(a["train_loss"] - b["train_loss"]) < 1e-5

    (half,) = _run(tmp_path, "half", batch=16, epochs=2, procs=1)  # the check can fail: other batches differ
    assert any(not torch.allclose(half[k], single[k], rtol=1e-4, atol=1e-5) for k in single)


def _history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_commands_other_than_train_and_eval_refuse_torchrun(tmp_path):
    env = _env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost"}
    done = subprocess.run([sys.executable, "-m", "learn2defend", "compare", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "torchrun" in done.stderr
    assert not (tmp_path / "c").exists()


def test_resume_keeps_the_global_batch(tmp_path):
    from learn2defend import TrainConfig, train
    from learn2defend.errors import UserError

    def config(batch, epochs):
        return TrainConfig(out=str(tmp_path / "run"), dataset="fake:1x8x8:4", train_size=64, val_size=16,
                           model="smallcnn", epochs=epochs, batch_size=batch, val_robust_n=0, progress=False,
                           device="cpu", data_dir=str(tmp_path / "data"))

    train(config(16, 1))
    with pytest.raises(UserError, match="trained with 1 process.* x 16; keep --batch-size 16"):
        train(config(8, 2), resume=True)  # one process: the global batch would change
    assert train(config(16, 2), resume=True).epoch == 2


def test_eval_with_more_processes_than_images(tmp_path):
    # 2 processes, 1 image: rank 1's shard is empty and must simply add nothing
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "learn2defend", "train", "--dataset", "digits", "--epochs", "1",
                           "--val-robust-n", "0", "--no-progress", "--out", str(run)],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    # --n-images, not --n, which torchrun's parser would take for a prefix of its own options
    args = ["eval", "--checkpoint", str(run), "--n-images", "1", "--attacks", "fgsm,autoattack-fast", "--json"]
    single = subprocess.run([sys.executable, "-m", "learn2defend", *args],
                            capture_output=True, text=True, timeout=120, env=_env())
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=localhost:{_free_port()}", "-m", "learn2defend", *args],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout)["accuracy"] == json.loads(single.stdout)["accuracy"]
    assert json.loads(two.stdout)["n"] == 1


SHUTDOWN_WORKER = textwrap.dedent("""
    import pathlib
    import sys
    import time
    from learn2defend import distributed

    distributed.init_from_env("cpu")
    late, rank = pathlib.Path(sys.argv[1]), distributed.rank()
    if rank == 0:  # rank 0 still works when rank 1 wants to leave
        time.sleep(1.5)
        late.write_text("rank 0 is leaving")
    distributed.shutdown()
    if rank == 0 or late.exists():
        sys.exit(0)
    sys.exit("rank 1 left the process group before rank 0 had finished")
""")


def test_ranks_leave_the_process_group_together(tmp_path):
    # a rank that tore gloo down while another still worked was aborted at exit now and then
    # (SIGABRT: "terminate called without an active exception"); shutdown waits for the others
    script = tmp_path / "shutdown_worker.py"
    script.write_text(SHUTDOWN_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=localhost:{_free_port()}", str(script), str(tmp_path / "late")],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
