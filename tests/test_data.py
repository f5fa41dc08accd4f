"""Tests for learn2defend.data: sources, validation split, folder cache, DeviceLoader."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from learn2defend import data
from learn2defend.data import DeviceLoader, ImageData, load_dataset
from learn2defend.errors import UserError


def row_bytes(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


# ---------------------------------------------------------------- built-in sources

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_size=0.1, split_seed=0)


def test_digits_shapes_and_range(digits):
    assert digits.name == "digits"
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train) + len(digits.val) == 1797 and len(digits.val) == 180
    for part in (digits.train, digits.val):
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert part.images.shape[1:] == (1, 8, 8) and part.images.device.type == "cpu"
    assert digits.train.images.min() == 0 and digits.train.images.max() == 255
    assert set(digits.train.labels.tolist()) == set(range(10))
    assert digits.test is None and not digits.flip and digits.crop_padding == 0
    assert len(digits.mean) == len(digits.std) == 1
    x = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(x.mean().item())
    assert digits.std[0] == pytest.approx(x.std(unbiased=False).item())
    assert digits.split("train") is digits.train and digits.split("val") is digits.val
    with pytest.raises(UserError, match="no test split; use --split val"):
        digits.split("test")


def test_split_is_seeded_disjoint_and_complete():
    a = load_dataset("fake:1x8x8:2", val_size=100, split_seed=1)
    b = load_dataset("fake:1x8x8:2", val_size=100, split_seed=1)
    c = load_dataset("fake:1x8x8:2", val_size=100, split_seed=2)
    assert len(a.val) == 100 and len(a.train) == 2048 - 100
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    train, val = set(row_bytes(a.train.images)), set(row_bytes(a.val.images))
    assert not train & val and len(train | val) == 2048  # noise makes every image unique


@pytest.mark.parametrize("val_size", [0, -1, 0.0, 1.0, 1.5, 2048, 5000, True, "0.1"])
def test_bad_val_size(val_size):
    with pytest.raises(UserError):
        load_dataset("fake:1x4x4:2", val_size=val_size)


def test_fake_is_deterministic_and_learnable():
    a = load_dataset("fake:3x16x12:5")
    b = load_dataset("fake:3x16x12:5")
    assert a.name == "fake:3x16x12:5" and a.classes == ["0", "1", "2", "3", "4"]
    assert a.image_shape == (3, 16, 12) and len(a.test) == 512
    assert a.crop_padding == 0 and not a.flip
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    # nearest class mean, fitted on train, is nearly perfect on test
    x = a.train.images.flatten(1).float()
    means = torch.stack([x[a.train.labels == k].mean(0) for k in range(5)])
    pred = torch.cdist(a.test.images.flatten(1).float(), means).argmin(1)
    assert (pred == a.test.labels).float().mean() > 0.95


@pytest.mark.parametrize("spec", ["fake", "fake:", "fake:3x32:10", "fake:3x32x32", "fake:3x32x32:1",
                                  "fake:0x32x32:10", "fake:3x32x32:ten", "fake:3x9999x32:10"])
def test_bad_fake_spec(spec):
    with pytest.raises(UserError, match="fake:CxHxW:K|fake data needs"):
        load_dataset(spec)


@pytest.mark.parametrize("spec", ["imagenet", "cifar", "digits:3", "folder:", "mnist:x", ""])
def test_unknown_spec(spec):
    with pytest.raises(UserError, match="valid specs: digits, mnist, cifar10"):
        load_dataset(spec)


def test_image_size_only_for_folders():
    with pytest.raises(UserError, match="--image-size"):
        load_dataset("digits", image_size=32)
    assert load_dataset("fake:1x8x8:2", image_size=8).image_shape == (1, 8, 8)


@pytest.mark.parametrize("spec, title", [("mnist", "MNIST"), ("cifar10", "CIFAR-10"),
                                         ("cifar100", "CIFAR-100"), ("svhn", "SVHN")])
def test_missing_torchvision_set_without_download(tmp_path, spec, title):
    with pytest.raises(UserError, match=f"{title} not found under .*add --download"):
        load_dataset(spec, tmp_path, download=False)


def test_mnist_from_raw_files(tmp_path):
    """Tiny idx files in torchvision's layout: checks the conversion, not torchvision."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    parts = {}
    for prefix, n in (("train", 12), ("t10k", 4)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        header = struct.pack(">IIII", 0x803, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n)
                                                          + labels.numpy().tobytes())
        parts[prefix] = images, labels
    ds = load_dataset("mnist", tmp_path, val_size=2)
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10 and not ds.flip
    assert torch.equal(ds.test.images[:, 0], parts["t10k"][0])
    assert torch.equal(ds.test.labels, parts["t10k"][1].long())
    assert len(ds.train) == 10 and ds.train.images.dtype == torch.uint8


def test_cifar10_from_batches(tmp_path, monkeypatch):
    """Pickled batches in torchvision's layout (checksums skipped): images come out NCHW."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        entry = {"data": rows[name], "labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    ds = load_dataset("cifar10", tmp_path, val_size=1)
    assert ds.classes == names and ds.image_shape == (3, 32, 32) and ds.flip
    assert ds.crop_padding == 4 and len(ds.train) == 14
    expected = torch.from_numpy(rows["test_batch"].reshape(3, 3, 32, 32))  # R, G, B planes
    assert torch.equal(ds.test.images, expected) and ds.test.labels.tolist() == [1, 2, 3]


# ---------------------------------------------------------------- image folders

COLORS = {"cat": (200, 30, 30), "dog": (20, 40, 220)}


def save(path, size=(10, 10), color=(0, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


@pytest.fixture
def tree(tmp_path):
    """root/train/{cat: 3 PNG, dog: 3 JPEG}, root/test/{cat: PNG, dog: JPEG}, all 10x10 RGB."""
    root = tmp_path / "pets"
    for i in range(3):
        save(root / "train" / "cat" / f"{i}.png", color=COLORS["cat"])
        save(root / "train" / "dog" / f"{i}.jpg", color=COLORS["dog"])
    save(root / "test" / "cat" / "t.png", color=COLORS["cat"])
    save(root / "test" / "dog" / "t.JPEG", color=COLORS["dog"])
    (root / "train" / "cat" / "notes.txt").write_text("not an image, not an image file name")
    return root


def load_tree(root, tmp_path, **kw):
    kw.setdefault("val_size", 1)
    return load_dataset(f"folder:{root}", tmp_path / "data", **kw)


def test_folder_loads(tree, tmp_path):
    ds = load_tree(tree, tmp_path)
    assert ds.name == f"folder:{tree.resolve()}"
    assert ds.classes == ["cat", "dog"] and ds.image_shape == (3, 10, 10)
    assert len(ds.train) + len(ds.val) == 6 and len(ds.test) == 2
    assert ds.flip and ds.crop_padding == 1
    assert sorted(ds.test.labels.tolist()) == [0, 1]
    cat = ds.test.images[ds.test.labels.tolist().index(0)]
    assert cat.dtype == torch.uint8
    expected = torch.tensor(COLORS["cat"], dtype=torch.uint8)[:, None, None].expand(3, 10, 10)
    assert torch.equal(cat, expected)
    dog = ds.test.images[ds.test.labels.tolist().index(1)]
    assert (dog.int() - torch.tensor(COLORS["dog"])[:, None, None]).abs().max() <= 3
    assert (tmp_path / "data" / "cache").is_dir()


def test_folder_grayscale_gives_one_channel(tmp_path):
    root = tmp_path / "gray"
    for cls in ("a", "b"):
        save(root / "train" / cls / "x.png", mode="L")
        save(root / "train" / cls / "y.png", mode="1")
    assert load_tree(root, tmp_path).image_shape == (1, 10, 10)
    save(root / "train" / "b" / "z.png", mode="RGB")  # one colour image: everything is RGB
    assert load_tree(root, tmp_path).image_shape == (3, 10, 10)


def test_folder_mixed_sizes_need_image_size(tree, tmp_path):
    save(tree / "train" / "dog" / "big.jpg", size=(20, 14))
    with pytest.raises(UserError, match="different sizes.*--image-size N"):
        load_tree(tree, tmp_path)
    ds = load_tree(tree, tmp_path, image_size=8)
    assert ds.image_shape == (3, 8, 8) and len(ds.train) + len(ds.val) == 7 and ds.crop_padding == 1


def test_folder_bad_images(tree, tmp_path, capfd):
    (tree / "train" / "cat" / "bad.png").write_bytes(b"this is no png")
    (tree / "train" / "dog" / "empty.jpg").write_bytes(b"")
    ds = load_tree(tree, tmp_path, on_bad_image="skip")
    assert len(ds.train) + len(ds.val) == 6
    assert "skipped 2 unreadable" in capfd.readouterr().err
    with pytest.raises(UserError, match="bad.png"):  # from the cache written by the skip run
        load_tree(tree, tmp_path, on_bad_image="fail")
    with pytest.raises(UserError, match="bad.png"):  # and without a cache
        load_tree(tree, tmp_path / "other", on_bad_image="fail")
    with pytest.raises(UserError, match="on_bad_image"):
        load_tree(tree, tmp_path, on_bad_image="ignore")


def test_folder_structure_errors(tree, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tree(tmp_path / "nowhere", tmp_path)
    (tmp_path / "no_train").mkdir()
    with pytest.raises(UserError, match="no train/ folder"):
        load_tree(tmp_path / "no_train", tmp_path)
    (tree / "test" / "bird").mkdir()
    save(tree / "test" / "bird" / "b.png")
    with pytest.raises(UserError, match="class folders .* differ"):
        load_tree(tree, tmp_path)
    (tree / "train" / "bird").mkdir()
    with pytest.raises(UserError, match="has no image files"):
        load_tree(tree, tmp_path, on_bad_image="fail")
    with pytest.raises(UserError, match="class folders .* differ"):  # skip leaves train/bird out
        load_tree(tree, tmp_path)


def test_folder_ignores_symlink_loops(tree, tmp_path):
    os.symlink(tree / "train", tree / "train" / "cat" / "loop", target_is_directory=True)
    ds = load_tree(tree, tmp_path)
    assert len(ds.train) + len(ds.val) == 6


def test_folder_cache(tree, tmp_path, monkeypatch):
    first = load_tree(tree, tmp_path)
    real_decode = data._decode_image
    calls = []

    def counting_decode(path, image_size):
        calls.append(path)
        return real_decode(path, image_size)

    monkeypatch.setattr(data, "_decode_image", counting_decode)
    second = load_tree(tree, tmp_path)
    assert calls == []  # served from the cache
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels) and second.classes == first.classes

    save(tree / "train" / "dog" / "3.jpg", color=COLORS["dog"])  # a new file invalidates it
    assert len(load_tree(tree, tmp_path).train) == 6 and len(calls) == 9

    (cache,) = (tmp_path / "data" / "cache").glob("*.safetensors")
    cache.write_bytes(b"garbage")  # a corrupt cache is rebuilt
    calls.clear()
    assert len(load_tree(tree, tmp_path).train) == 6 and len(calls) == 9
    calls.clear()
    load_tree(tree, tmp_path)
    assert calls == []
    assert not list((tmp_path / "data" / "cache").glob("*.tmp"))


# ---------------------------------------------------------------- loader

def id_data(n=103, shape=(3, 6, 6)):
    """Random images whose label is their index, so batches reveal which samples they hold."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
    return ImageData(images, torch.arange(n))


def epoch_ids(loader, epoch=0, start=0):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader.iterate(start)])


def test_loader_batches_and_epoch_cover():
    d = id_data()
    loader = DeviceLoader(d, 10, "cpu", drop_last=False)
    assert len(loader) == 11
    batches = list(loader)
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, d.images[y].float() / 255)  # augment=False: exact
    assert torch.equal(torch.cat([y for _, y in batches]).sort().values, torch.arange(103))
    assert len(DeviceLoader(d, 10, "cpu", drop_last=True)) == 10
    ordered = DeviceLoader(d, 10, "cpu", shuffle=False, drop_last=False)
    assert torch.equal(epoch_ids(ordered), torch.arange(103))


def test_loader_shuffle_is_pure_function_of_seed_and_epoch():
    d = id_data()
    a, b = DeviceLoader(d, 10, "cpu"), DeviceLoader(d, 10, "cpu")
    assert torch.equal(epoch_ids(a, 0), torch.cat([y for _, y in b]))  # default epoch is 0
    assert torch.equal(epoch_ids(a, 3), epoch_ids(b, 3))
    assert not torch.equal(epoch_ids(a, 0), epoch_ids(a, 1))
    assert not torch.equal(epoch_ids(a, 1), epoch_ids(DeviceLoader(d, 10, "cpu", seed=1), 1))


def test_loader_resume_mid_epoch_matches_full_pass():
    loader = DeviceLoader(id_data(), 8, "cpu", augment=True, crop_padding=2, flip=True)
    loader.set_epoch(5)
    full = list(loader)
    tail = list(loader.iterate(7))
    assert len(tail) == len(full) - 7
    for (x1, y1), (x2, y2) in zip(full[7:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert list(loader.iterate(len(loader))) == []
    with pytest.raises(ValueError):
        loader.iterate(len(loader) + 1)


def test_augment_flip():
    d = id_data()
    loader = DeviceLoader(d, 103, "cpu", drop_last=False, augment=True, flip=True)
    x, y = next(iter(loader))
    original = d.images[y].float() / 255
    same = (x == original).flatten(1).all(1)
    mirrored = (x == original.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_augment_crop():
    d = id_data()
    p = 2
    loader = DeviceLoader(d, 103, "cpu", drop_last=False, augment=True, crop_padding=p)
    x, y = next(iter(loader))
    assert x.shape == (103, 3, 6, 6) and x.min() >= 0 and x.max() <= 1
    padded = torch.nn.functional.pad(d.images[y], (p, p, p, p)).float() / 255
    shifts = torch.stack([padded[:, :, i:i + 6, j:j + 6] for i in range(2 * p + 1)
                          for j in range(2 * p + 1)], 1)  # [B, 25, C, H, W]
    matches = (shifts == x[:, None]).flatten(2).all(2)
    assert bool(matches.any(1).all())  # every image is one of the 25 crops
    centred = matches[:, 2 * (2 * p + 1) + 2]
    assert not centred.all() and matches.any(0).sum() > 10  # and the offsets vary
    x2, _ = next(iter(loader))
    assert torch.equal(x, x2)  # same epoch, same crops
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x2)


def test_rank_sharding():
    d = id_data(103)
    ranks = [DeviceLoader(d, 10, "cpu", drop_last=False, seed=4, rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 51 samples each, one trimmed
    ids = [epoch_ids(r, epoch=2) for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 51
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    gen = torch.Generator().manual_seed(data._seed("order", 4, 2))
    assert torch.equal(torch.cat(ids).sort().values,
                       torch.randperm(103, generator=gen)[:102].sort().values)
    single = DeviceLoader(d, 10, "cpu", seed=4)
    single.set_epoch(2)
    assert torch.equal(single.order()[:102:2], ids[0])  # rank r takes every 2nd sample from r


def test_loader_needs_a_batch():
    with pytest.raises(UserError, match="smaller --batch-size"):
        DeviceLoader(id_data(5), 8, "cpu", drop_last=True)
    with pytest.raises(ValueError):
        DeviceLoader(id_data(5), 2, "cpu", rank=2, world_size=2)


def test_loader_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    d = id_data()
    kw = dict(augment=True, crop_padding=2, flip=True, seed=3)
    cpu, gpu = DeviceLoader(d, 16, "cpu", **kw), DeviceLoader(d, 16, "cuda", **kw)
    for (x1, y1), (x2, y2) in zip(cpu, gpu, strict=True):
        assert x2.is_cuda and torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())


def test_channel_stats_constant_channel():
    images = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    images[:, 1] = 255
    mean, std = data._channel_stats(images)
    assert mean == pytest.approx((0.0, 1.0)) and min(std) > 0


def test_folder_test_split_first_n_is_a_random_subset(tmp_path):
    # Files sorted by class: the first 30 of 60 test files are all class "a". The first 30
    # test images must come from every class, in the same order on every load.
    root = tmp_path / "sorted"
    for cls in ("a", "b", "c"):
        save(root / "train" / cls / "0.png")
        save(root / "train" / cls / "1.png")
        for i in range(20):
            save(root / "test" / cls / f"{i:02d}.png")
    first = load_tree(root, tmp_path).test
    assert len(first) == 60 and first.labels.bincount().tolist() == [20, 20, 20]  # the whole split kept
    assert first.labels[:30].unique().tolist() == [0, 1, 2]
    assert 5 <= (first.labels[:30] == 0).sum() <= 15
    again = load_tree(root, tmp_path, split_seed=7).test  # cached now; another validation split
    assert torch.equal(again.labels, first.labels) and torch.equal(again.images, first.images)
