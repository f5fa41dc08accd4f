"""The streaming loader (learn2defend.data.stream), imagenet:PATH and --loader: on an
ImageNet-style tree made here (wnid folders, JPEGs of random sizes, gray, CMYK, PNG with
alpha, one truncated file), a tiny model, workers 0-1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learn2defend.data import DeviceLoader, FileData, load_dataset, make_loader
from learn2defend.data.stream import StreamLoader, eval_transform, read_image

WNIDS = ["n01440764", "n01443537", "n01484850"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _image(rng: np.random.Generator, label: int) -> np.ndarray:
    """An RGB image of random size, 40-80 px a side, tinted by its class (learnable)."""
    h, w = rng.integers(40, 81, size=2)
    base = np.zeros(3)
    base[label % 3] = 200
    return np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)


def make_tree(root: Path, per_class: int = 12, val_per_class: int = 4, *, truncated: bool = True,
              seed: int = 0) -> Path:
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG; among them grayscale JPEGs, a
    CMYK JPEG, a PNG with alpha, a palette PNG and (truncated=True) one truncated JPEG."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for label, wnid in enumerate(WNIDS):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                im = Image.fromarray(_image(rng, label))
                name = f"{wnid}_{i}"
                if i == 1:
                    im.convert("L").save(d / f"{name}.JPEG", quality=90)
                elif i == 2 and label == 0:
                    im.convert("CMYK").save(d / f"{name}.JPEG", quality=90)
                elif i == 3 and label == 1:
                    rgba = im.convert("RGBA")
                    rgba.putalpha(128)
                    rgba.save(d / f"{name}.png")
                elif i == 4 and label == 2:
                    im.convert("P").save(d / f"{name}.png")
                else:
                    im.save(d / f"{name}.JPEG", quality=90)
    if truncated:
        bad = root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
        bad.write_bytes(bad.read_bytes()[: 300])
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "learn2defend", *args], capture_output=True, text=True, env=full,
                          timeout=600)


def test_decoding_gray_cmyk_alpha_and_palette_give_rgb(tree):
    for path in sorted((tree / "train").rglob("*_[1234].*")):
        x = read_image(str(path))
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and 40 <= x.shape[1] <= 80, path


def test_eval_transform_shapes():
    for h, w in ((40, 80), (80, 40), (57, 57), (300, 500)):
        out = eval_transform(32)(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert eval_transform(224)(torch.zeros(3, 375, 500, dtype=torch.uint8)).shape == (3, 224, 224)


def test_imagenet_spec_streams_with_wnids_words_and_official_val_as_test(tree):
    ds = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    assert ds.streamed and ds.classes == WNIDS and ds.image_shape == (3, 32, 32)
    assert ds.class_words[0] == "tench, Tinca tinca"
    assert len(ds.train) + len(ds.val) == 36 and len(ds.val) == 6 and len(ds.test) == 12
    assert ds.mean == (0.485, 0.456, 0.406)
    assert all(str(tree / "val") in p for p in ds.test.paths)
    again = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    assert again.val.paths == ds.val.paths and again.test.paths == ds.test.paths


def test_order_and_sharding_match_the_device_loader(tree):
    ds = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    memory = DeviceLoader(type("D", (), {"images": torch.zeros(len(ds.train), 1, 1, 1, dtype=torch.uint8),
                                         "labels": ds.train.labels, "__len__": lambda s: len(ds.train.labels)})(),
                          4, "cpu", seed=3)
    stream = StreamLoader(ds.train, 4, "cpu", seed=3, workers=0)
    for epoch in (0, 2):
        memory.set_epoch(epoch)
        stream.set_epoch(epoch)
        assert torch.equal(memory.order(), stream.order()) and len(memory) == len(stream)


def _epoch(loader: StreamLoader, start: int = 0) -> list[torch.Tensor]:
    return [torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader.iterate(start)]


def test_batches_are_a_function_of_seed_epoch_and_index(tree):
    ds = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    data = FileData(ds.train.paths[:16], ds.train.labels[:16], 32)
    a = StreamLoader(data, 4, "cpu", augment=True, flip=True, seed=1, workers=0)
    b = StreamLoader(data, 4, "cpu", augment=True, flip=True, seed=1, workers=1)
    a.set_epoch(1)
    b.set_epoch(1)
    full = _epoch(a)
    assert all(torch.equal(x, y) for x, y in zip(full, _epoch(b), strict=True))  # worker processes alike
    assert all(torch.equal(x, y) for x, y in zip(full[2:], _epoch(a, 2), strict=True))  # resumed mid-epoch
    x, _ = next(a.iterate())
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    a.set_epoch(2)
    assert not torch.equal(_epoch(a)[0], full[0])  # another epoch, other crops and order


def test_two_ranks_read_disjoint_shards_covering_the_epoch(tree):
    ds = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    single = StreamLoader(ds.train, 4, "cpu", seed=5, workers=0)
    ranks = [StreamLoader(ds.train, 2, "cpu", seed=5, rank=r, world_size=2, workers=0) for r in (0, 1)]
    for loader in (single, *ranks):
        loader.set_epoch(3)
    a, b = (set(r.order().tolist()) for r in ranks)
    assert not a & b and a | b == set(single.order()[: len(ranks[0].order()) * 2].tolist())
    assert len(a | b) == len(ds.train) // 2 * 2


def test_loader_auto_streams_above_the_limit(tree, monkeypatch):
    monkeypatch.setenv("LEARN2DEFEND_MEMORY_LIMIT", str(48 * 3 * 32 * 32 + 1))
    small = load_dataset(f"imagenet:{tree}", image_size=32, loader="auto", val_size=6)
    assert not small.streamed and small.loader == "memory" and small.train.images.shape[1:] == (3, 32, 32)
    monkeypatch.setenv("LEARN2DEFEND_MEMORY_LIMIT", "1000")
    large = load_dataset(f"imagenet:{tree}", image_size=32, loader="auto", val_size=6)
    assert large.streamed and "auto" in large.loader_reason and "1000" in large.loader_reason
    assert make_loader(large.train, 4, "cpu", workers=0).__class__ is StreamLoader


def _train_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", f"imagenet:{tree}", "--image-size", "32", "--model", "smallcnn-pooled",
            "--method", "fgsm", "--eps", "4/255", "--epochs", "1", "--batch-size", "8", "--val-size", "6",
            "--val-robust-n", "4", "--workers", "1", "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_train_one_epoch_streamed_then_eval_the_official_val(tree, tmp_path):
    out = tmp_path / "run"
    r = _cli(*_train_args(tree, out, "--loader", "auto"), env={"LEARN2DEFEND_MEMORY_LIMIT": "1000"})
    assert r.returncode == 0, r.stderr
    assert "loader stream (auto:" in r.stderr and "random-resized crop 32 px" in r.stderr
    assert "skipped 1 unreadable image file(s) of the" in r.stderr  # the truncated JPEG
    config = json.loads((out / "config.json").read_text())
    assert config["loader"] == "auto" and config["dataset"] == f"imagenet:{tree}"
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else None
    assert history is None or len(history) == 1
    r = _cli("eval", "--checkpoint", str(out), "--split", "test", "--n-images", "5", "--attacks", "fgsm", "--json",
             "--device", "cpu", env={"LEARN2DEFEND_MEMORY_LIMIT": "1000"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 5 and result["split"] == "test" and 0 <= result["accuracy"]["clean"] <= 1


def test_exact_resume_mid_epoch_with_the_streaming_loader(tree, tmp_path, monkeypatch):
    from learn2defend import TrainConfig, methods
    from learn2defend.checkpoint import load_state
    from learn2defend.train import train

    def config(name: str) -> TrainConfig:
        return TrainConfig(out=str(tmp_path / name), dataset=f"imagenet:{tree}", image_size=32,
                           model="smallcnn-pooled", method="fgsm", eps=4 / 255, epochs=2, batch_size=6, val_size=6,
                           val_robust_n=0, loader="stream", workers=0, device="cpu", progress=False,
                           checkpoint_every=2)

    real, calls = methods.STEPS["fgsm"], []

    def counted(ctx, x, y):
        calls.append(1)
        if crash_at and len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return real(ctx, x, y)

    crash_at = 0
    monkeypatch.setitem(methods.STEPS, "fgsm", counted)
    full = train(config("full"))
    per_epoch = len(calls) // 2
    calls.clear()
    crash_at = per_epoch + 4  # in epoch 2; its last checkpoint is then 2 batches into it
    with pytest.raises(RuntimeError, match="simulated"):
        train(config("part"))
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 2)
    crash_at = 0
    resumed = train(config("part"), resume=True)
    a = load_state(full.path / "last.safetensors")["model"]
    b = load_state(resumed.path / "last.safetensors")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


@pytest.mark.parametrize("case", ["corrupt", "empty_class", "memory_too_small", "flat_val"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case):
    root = make_tree(tmp_path / "tree", per_class=4, val_per_class=2, truncated=case == "corrupt")
    extra, env = ["--on-bad-image", "fail"], {}
    if case == "empty_class":
        (root / "train" / "n09999999").mkdir()
        (root / "val" / "n09999999").mkdir()
    elif case == "memory_too_small":
        extra, env = ["--loader", "memory"], {"LEARN2DEFEND_MEMORY_LIMIT": "1000"}
    elif case == "flat_val":
        for f in list((root / "val").rglob("*.*")):
            f.rename(root / "val" / f.name)
        for d in (root / "val").iterdir():
            if d.is_dir():
                d.rmdir()
    out = tmp_path / "run"
    r = _cli(*_train_args(root, out, *extra), env=env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert {"corrupt": "cannot read image", "empty_class": "has no image files",
            "memory_too_small": "--loader stream", "flat_val": "valprep.sh"}[case] in lines[0]
    assert not out.exists()


GLOO_WORKER = """
import json, sys
from learn2defend import TrainConfig, distributed, train
from learn2defend.data import stream

seen = []
real = stream._Samples.__getitem__

def recording(self, key):
    if self.augment:  # the training split's samples, not validation's
        seen.append([key[1], self.data.paths[key[0]]])
    return real(self, key)

stream._Samples.__getitem__ = recording
tree, out = sys.argv[1], sys.argv[2]
distributed.init_from_env("cpu")
train(TrainConfig(out=out, dataset="imagenet:" + tree, image_size=32, model="smallcnn-pooled", method="plain",
                  epochs=2, batch_size=4, val_size=6, val_robust_n=0, loader="stream", workers=0, device="cpu",
                  progress=False))
with open(f"{out}-rank{distributed.rank()}.json", "w") as f:
    json.dump(seen, f)
"""


def test_two_gloo_ranks_read_disjoint_shards_that_cover_each_epoch(tree, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(GLOO_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=SRC)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=localhost:{port}", str(script), str(tree), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]
    ds = load_dataset(f"imagenet:{tree}", image_size=32, loader="stream", val_size=6)
    from learn2defend.data import check_streamed

    train = check_streamed(ds, "skip").train
    single = StreamLoader(train, 8, "cpu", seed=0, workers=0)  # one process, the same global batch
    for epoch in (0, 1):
        a, b = ([p for e, p in seen if e == epoch] for seen in ranks)
        assert len(a) == len(b) == len(train) // 8 * 4  # 4 images per rank and batch, whole batches
        single.set_epoch(epoch)
        epoch_files = {train.paths[i] for i in single.order()[: len(single) * 8].tolist()}
        assert not set(a) & set(b) and set(a) | set(b) == epoch_files
    assert [p for e, p in ranks[0] if e == 0] != [p for e, p in ranks[0] if e == 1]  # reshuffled each epoch


def _tensors(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = (torch.rand(n, 3, 8, 8, generator=gen) * 0.5 + labels[:, None, None, None] * 0.25).clamp(0, 1)
    return images, labels


def test_train_on_python_tensors_and_dataset_resume_asks_for_the_data(tmp_path):
    from learn2defend import TrainConfig, UserError, train
    from learn2defend.checkpoint import load_state

    images, labels = _tensors()

    def config(name: str, epochs: int) -> TrainConfig:
        return TrainConfig(out=str(tmp_path / name), model="smallcnn", epochs=epochs, batch_size=8, val_size=8,
                           val_robust_n=0, device="cpu", progress=False)

    run = train(config("t", 1), data=(images, labels))
    assert run.config.data.dataset == "python" and len(run.history) == 1
    assert json.loads((tmp_path / "t" / "config.json").read_text())["dataset"] == "python"
    with pytest.raises(UserError, match="trained on data given from Python"):
        train(config("t", 2), resume=True)
    other = (images.flip(0), labels.flip(0))
    with pytest.raises(UserError, match="other data given from Python"):
        train(config("t", 2), resume=True, data=other)
    assert train(config("t", 2), resume=True, data=(images, labels)).epoch == 2

    class Items(torch.utils.data.Dataset):  # map-style, uint8 images
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return (images[i] * 255).round().to(torch.uint8), int(labels[i])

    from_dataset = train(config("d", 2), data=Items())
    a, b = (load_state(tmp_path / name / "last.safetensors")["model"] for name in ("t", "d"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same images as uint8: the same run
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        train(config("bad", 1), data=(images * 2, labels))
    assert not (tmp_path / "bad").exists() and from_dataset.epoch == 2
