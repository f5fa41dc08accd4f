"""cifar10, cifar100, svhn and mnist through torchvision, from tiny files in each set's own on-disk format.

Nothing is downloaded: each fixture writes a few synthetic images in the layout torchvision reads
(CIFAR's pickled batches and label-name metadata, SVHN's MATLAB .mat files, MNIST's idx files), then
`train` and `eval` run on them through the command line.

torchvision decides that a data set is present as follows (torchvision/datasets/):
- CIFAR-10/100: `check_integrity(file, md5)` of every batch and of the metadata file, against the
  md5 of the real files, written in the class attributes `train_list`, `test_list` and `meta`;
- SVHN: `check_integrity(file, md5)` of the split's .mat file, md5 in `SVHN.split_list`;
- MNIST: the four uncompressed idx files under MNIST/raw/ exist (no checksum; the .gz archives are
  only what `download` fetches and unpacks).

No small file can have the md5 of the real 170 MB archives' contents, so the CIFAR and SVHN fixtures
set those expected checksums to the md5 of the files they write (`_expect_checksums`). torchvision's
own check still runs on every load: `test_damaged_file_is_reported` changes one byte and sees it fail.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from learn2defend.cli import main
from learn2defend.data import load_dataset
from learn2defend.errors import UserError
from learn2defend.runs import load_run

N_TRAIN, N_TEST = 20, 8  # per data set; CIFAR-10's five training batches hold 4 images each
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"class{i:02d}" for i in range(100)]
MNIST_NAMES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
               "8 - eight", "9 - nine"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(seed: int, n: int, c: int, h: int, w: int) -> np.ndarray:
    """Random uint8 images [N, C, H, W]: no symmetry, so a swapped axis or channel shows."""
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def _labels(seed: int, n: int, k: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, k, n).astype(np.int64)


def _expect_checksums(monkeypatch: pytest.MonkeyPatch, kind: str, root: Path) -> None:
    """Point torchvision's expected md5s at the fixture files (see the module docstring)."""
    from torchvision import datasets

    if kind in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
        folder = root / cls.base_folder
        for attr in ("train_list", "test_list"):
            monkeypatch.setattr(cls, attr, [[name, _md5(folder / name)] for name, _ in getattr(cls, attr)])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    elif kind == "svhn":
        split_list = {split: [url, name, _md5(root / name) if (root / name).exists() else md5]
                      for split, (url, name, md5) in datasets.SVHN.split_list.items()}
        monkeypatch.setattr(datasets.SVHN, "split_list", split_list)


def write_cifar10(root: Path) -> dict:
    """cifar-10-batches-py/: data_batch_1..5 and test_batch ({"data": [N, 3072] uint8 rows of
    R, G, B planes, "labels": list}), batches.meta ({"label_names": [...]}), pickled."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train, test = _images(0, N_TRAIN, 3, 32, 32), _images(1, N_TEST, 3, 32, 32)
    train_y, test_y = _labels(0, N_TRAIN, 10), _labels(1, N_TEST, 10)
    per = N_TRAIN // 5
    for i in range(5):
        rows = slice(i * per, (i + 1) * per)
        entry = {"batch_label": f"training batch {i + 1} of 5", "data": train[rows].reshape(per, -1),
                 "labels": train_y[rows].tolist(), "filenames": [f"img{j}.png" for j in range(per)]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"batch_label": "testing batch 1 of 1", "data": test.reshape(N_TEST, -1), "labels": test_y.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train": (train, train_y), "test": (test, test_y), "classes": CIFAR10_NAMES, "shape": (3, 32, 32)}


def write_cifar100(root: Path) -> dict:
    """cifar-100-python/: train and test ({"data", "fine_labels", "coarse_labels"}) and meta
    ({"fine_label_names", "coarse_label_names"}), pickled."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = _images(2, N_TRAIN, 3, 32, 32), _images(3, N_TEST, 3, 32, 32)
    train_y, test_y = _labels(2, N_TRAIN, 100), _labels(3, N_TEST, 100)
    for name, x, y in (("train", train, train_y), ("test", test, test_y)):
        entry = {"data": x.reshape(len(x), -1), "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": CIFAR100_NAMES, "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train": (train, train_y), "test": (test, test_y), "classes": CIFAR100_NAMES, "shape": (3, 32, 32)}


def write_svhn(root: Path) -> dict:
    """train_32x32.mat and test_32x32.mat: X uint8 [32, 32, 3, N] (row, column, channel, image),
    y uint8 [N, 1] with digit 0 stored as label 10, as in the real files."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    train, test = _images(4, N_TRAIN, 3, 32, 32), _images(5, N_TEST, 3, 32, 32)
    train_y, test_y = _labels(4, N_TRAIN, 10), _labels(5, N_TEST, 10)
    train_y[0], test_y[0] = 0, 0  # at least one zero: stored as 10, read back as 0
    for name, x, y in (("train_32x32.mat", train, train_y), ("test_32x32.mat", test, test_y)):
        stored = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        scipy.io.savemat(root / name, {"X": x.transpose(2, 3, 1, 0), "y": stored})
    return {"train": (train, train_y), "test": (test, test_y), "classes": [str(i) for i in range(10)],
            "shape": (3, 32, 32)}


def write_mnist(root: Path) -> dict:
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte: big-endian idx headers (magic 0x803 for
    uint8 3-d, 0x801 for uint8 1-d, then the sizes) followed by the raw bytes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train, test = _images(6, N_TRAIN, 1, 28, 28), _images(7, N_TEST, 1, 28, 28)
    train_y, test_y = _labels(6, N_TRAIN, 10), _labels(7, N_TEST, 10)
    for prefix, x, y in (("train", train, train_y), ("t10k", test, test_y)):
        n = len(x)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n)
                                                          + y.astype(np.uint8).tobytes())
    return {"train": (train, train_y), "test": (test, test_y), "classes": MNIST_NAMES, "shape": (1, 28, 28)}


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn, "mnist": write_mnist}
FLIP = {"cifar10": True, "cifar100": True, "svhn": False, "mnist": False}


@pytest.fixture(params=list(WRITERS))
def tv_set(request, tmp_path, monkeypatch):
    """(spec, data dir, what was written) for each torchvision data set."""
    kind = request.param
    if kind == "svhn":
        pytest.importorskip("scipy", reason="torchvision reads SVHN's .mat files with scipy")
    root = tmp_path / "data"
    written = WRITERS[kind](root)
    _expect_checksums(monkeypatch, kind, root)
    return kind, root, written


def _rows(images: torch.Tensor | np.ndarray) -> list[bytes]:
    return sorted(bytes(np.asarray(x).tobytes()) for x in images)


def test_load_reads_images_labels_and_classes(tv_set):
    kind, root, written = tv_set
    ds = load_dataset(kind, root, val_size=4)
    assert ds.image_shape == written["shape"] and ds.classes == written["classes"] and ds.flip == FLIP[kind]
    # the official test split, in its own order, NCHW, labels as written (SVHN's 10 read back as 0)
    test_x, test_y = written["test"]
    assert torch.equal(ds.test.images, torch.from_numpy(test_x))
    assert ds.test.labels.dtype == torch.int64 and ds.test.labels.tolist() == test_y.tolist()
    # train + val: every training image exactly once, each with its own label
    train_x, train_y = written["train"]
    assert len(ds.train) == N_TRAIN - 4 and len(ds.val) == 4
    got = {bytes(x.numpy().tobytes()): int(y) for part in (ds.train, ds.val)
           for x, y in zip(part.images, part.labels, strict=True)}
    assert got == {bytes(x.tobytes()): int(y) for x, y in zip(train_x, train_y, strict=True)}


def test_train_and_eval_on_the_files(tv_set, tmp_path, capsys):
    kind, root, written = tv_set
    out = tmp_path / "run"
    code = main(["train", "--dataset", kind, "--data-dir", str(root), "--model", "smallcnn", "--method", "plain",
                 "--epochs", "1", "--batch-size", "8", "--val-size", "4", "--val-robust-n", "0", "--device", "cpu",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    run = load_run(out)
    assert run.meta["classes"] == written["classes"]
    assert run.meta["image_shape"] == list(written["shape"])
    assert run.meta["dataset"] == kind
    capsys.readouterr()
    for split, n in (("test", N_TEST), ("val", 4)):
        assert main(["eval", "--checkpoint", str(out), "--data-dir", str(root), "--split", split,
                     "--attacks", "fgsm", "--device", "cpu", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == n and result["dataset"] == kind
        assert set(result["accuracy"]) >= {"clean", "fgsm"}


def test_damaged_file_is_reported(tv_set):
    """torchvision's integrity check is live: one changed byte and the set is refused with one line."""
    kind, root, _ = tv_set
    victim = {"cifar10": "cifar-10-batches-py/test_batch", "cifar100": "cifar-100-python/test",
              "svhn": "test_32x32.mat", "mnist": "MNIST/raw/t10k-labels-idx1-ubyte"}[kind]
    path = root / victim
    if kind == "mnist":  # MNIST checks presence only: a missing file is what it refuses
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not found under .*damaged.*--download"):
        load_dataset(kind, root)
