"""Data sets as uint8 tensors, and a loader that keeps the whole set on the device; or,
for sets too large to hold or of images of varied sizes, as files streamed by
`learn2defend.data.stream` (`FileData`, `StreamLoader`).

Every source (scikit-learn's digits, torchvision's MNIST/CIFAR/SVHN, a folder of image
files, synthetic data) ends up as the same thing: an `ImageData` of uint8 images
[N, C, H, W] and int64 labels on the CPU. uint8 is 4x smaller than float32, so even
CIFAR fits on a GPU as a whole, and `DeviceLoader` then builds each batch with one
indexing operation on the device instead of a worker pool decoding images: the GPU
never waits for the CPU. Conversion to float in [0, 1] and augmentation happen per
batch on the device. Normalization is the model's job (`Dataset.mean/std` feed its
`Normalize` layer), so attack budgets stay in pixel units.

Which of the two a set gets is decided here (`load_dataset(loader=...)`, `--loader
auto|memory|stream`), and `make_loader` builds the matching loader for a split.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from learn2defend.data.stream import (
    IMAGENET_MEAN,
    IMAGENET_SIZE,
    IMAGENET_STD,
    FileData,
    StreamLoader,
    check_file,
    choose_loader,
    decode_all,
    drop_bad,
    estimated_stats,
    list_imagenet,
)
from learn2defend.data.tensors import NEEDS_DATA, PYTHON_SPEC, fingerprint, from_python  # noqa: F401 (re-exported)
from learn2defend.errors import UserError

VALID_SPECS = ("digits, mnist, cifar10, cifar100, svhn, folder:PATH, imagenet:PATH, "
               "fake:CxHxW:K (e.g. fake:3x32x32:10)")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm"}
CACHE_FORMAT = 1  # bump when the cache layout or the decoding changes: old caches are then ignored
FAKE_TRAIN, FAKE_TEST = 2048, 512
TEST_ORDER_SEED = 0  # the fixed order of a folder's test split (see _load_folder)
LOADERS = ("auto", "memory", "stream")


@dataclass
class ImageData:
    """One split: uint8 images [N, C, H, W] and int64 labels [N], both on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> ImageData:
        """The first `n` images."""
        return ImageData(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    """A loaded data set: its splits plus what models and augmentation need to know about it.
    Its splits are all `ImageData` (in memory) or all `FileData` (streamed from files)."""

    name: str  # the spec it was loaded from, e.g. "digits", "folder:/abs/path", "fake:3x32x32:10"
    train: ImageData | FileData  # training part (validation already removed)
    val: ImageData | FileData  # carved from the training set by split_seed
    test: ImageData | FileData | None  # the official test split where one exists
    classes: list[str]
    mean: tuple[float, ...]  # per channel, from train, in [0, 1] units
    std: tuple[float, ...]
    flip: bool  # horizontal flip keeps the label (False for digits: a mirrored 2 is not a 2)
    crop_padding: int  # random-crop padding for augmentation (0 = none)
    loader: str = "memory"  # memory (DeviceLoader) or stream (StreamLoader): what --loader chose
    loader_reason: str = ""  # why, for train's header
    class_words: list[str] | None = None  # imagenet: the words of each wnid, where the devkit's file is there

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FileData)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if isinstance(self.train, FileData):
            return self.train.image_shape
        c, h, w = self.train.images.shape[1:]
        return (c, h, w)

    def split(self, name: str) -> ImageData | FileData:
        """The split called "train", "val" or "test"; UserError if it does not exist."""
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split '{name}'; use train, val or test")
        if name == "test" and self.test is None:
            raise UserError("this data set has no test split; use --split val")
        return getattr(self, name)


@dataclass
class _Source:
    """What a source yields before the validation split: the full training set and test set."""

    train: ImageData
    test: ImageData | None
    classes: list[str]
    flip: bool
    crop_padding: int


def load_dataset(spec: str, data_dir: str | Path = "data", *, val_size: float | int = 0.1,
                 split_seed: int = 0, download: bool = False, image_size: int | None = None,
                 on_bad_image: str = "skip", loader: str = "memory",
                 device: torch.device | str | None = None) -> Dataset:
    """Load a data set by spec and carve a validation split from its training part.

    Specs: digits, mnist, cifar10, cifar100, svhn, folder:PATH, imagenet:PATH, fake:CxHxW:K.
    `data_dir` holds torchvision's downloads and the cache of decoded folders.
    `image_size` resizes folder images to image_size x image_size in memory, or is the crop
    of a streamed set (imagenet: 224 by default); the built-in sets have one fixed size and
    refuse any other. `on_bad_image` ("skip" or "fail") says what to do with folder files
    that cannot be decoded.

    `loader` (auto, memory or stream) says whether folder:PATH and imagenet:PATH are decoded
    into memory or streamed from their files (`FileData` splits; the train and val splits
    then still need `check_streamed`); auto streams where the decoded set (N x 3 x size x
    size bytes) exceeds what `stream.available_memory(device)` allows. The built-in sets
    always live in memory. UserError for --loader memory where the set cannot fit.
    """
    if on_bad_image not in ("skip", "fail"):
        raise UserError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    if loader not in LOADERS:
        raise UserError(f"--loader must be one of {', '.join(LOADERS)}, not {loader!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, not {image_size!r}")
    data_dir = Path(data_dir)
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind in ("folder", "imagenet") and arg:
        root = Path(arg).expanduser().resolve()
        name = f"{kind}:{root}"
        if kind == "imagenet":
            return _load_imagenet(root, name, image_size, on_bad_image, loader, device, val_size, split_seed)
        streamed = _maybe_stream_folder(root, name, image_size, on_bad_image, loader, device, val_size, split_seed)
        if streamed is not None:
            return streamed
        source = _load_folder(root, data_dir, image_size, on_bad_image)
    elif kind == PYTHON_SPEC and not arg:
        raise UserError(f"data set '{spec}': a run that {NEEDS_DATA}")
    else:
        if loader == "stream":
            raise UserError(f"--loader stream reads image files: folder:PATH and imagenet:PATH; '{spec}' "
                            "lives in memory (use --loader auto or memory)")
        name = spec if arg else kind
        if kind == "digits" and not arg:
            source = _load_digits()
        elif kind in _TORCHVISION and not arg:
            source = _load_torchvision(kind, data_dir, download)
        elif kind == "fake":
            source = _load_fake(arg)
        else:
            raise UserError(f"unknown data set '{spec}'; valid specs: {VALID_SPECS}")
        h, w = source.train.images.shape[-2:]
        if image_size is not None and (image_size, image_size) != (h, w):
            raise UserError(f"'{name}' has {h}x{w} images; --image-size only resizes "
                            "folder:PATH data sets, so leave it out")
    train, val = _split_off_val(source.train, val_size, split_seed)
    mean, std = _channel_stats(train.images)
    return Dataset(name=name, train=train, val=val, test=source.test, classes=source.classes,
                   mean=mean, std=std, flip=source.flip, crop_padding=source.crop_padding,
                   loader_reason="built-in data set: in memory" if kind != "folder" else "")


def python_dataset(data: object, *, val_size: float | int = 0.1, split_seed: int = 0) -> Dataset:
    """A Dataset of what a Python user holds (`tensors.from_python`: (images, labels) or a
    map-style dataset), split like any other. Named "python:<fingerprint>"; classes "0".."K-1";
    no augmentation unless the run asks for it (--flip, --crop-padding): nothing says what keeps
    the label of unknown images."""
    images, labels = from_python(data)
    train, val = _split_off_val(ImageData(images, labels), val_size, split_seed)
    mean, std = _channel_stats(train.images)
    return Dataset(name=f"{PYTHON_SPEC}:{fingerprint(images, labels)}", train=train, val=val, test=None,
                   classes=[str(k) for k in range(int(labels.max()) + 1)], mean=mean, std=std, flip=False,
                   crop_padding=0, loader_reason="data given from Python: in memory")


def _split_off_val(data: ImageData, val_size: float | int,
                   seed: int) -> tuple[ImageData, ImageData]:
    """(train, val): a random subset of `val_size` images becomes val.

    The permutation comes from a CPU torch.Generator seeded with `seed`, so the same seed
    gives the same split on every machine; both parts keep the original order.
    """
    val_idx, train_idx = _split_indices(len(data), val_size, seed)
    return (ImageData(data.images[train_idx], data.labels[train_idx]),
            ImageData(data.images[val_idx], data.labels[val_idx]))


def _split_indices(n: int, val_size: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(val indices, train indices) of `_split_off_val`, for in-memory and streamed sets alike."""
    if isinstance(val_size, numbers.Integral) and not isinstance(val_size, bool):
        n_val = int(val_size)
        if n_val < 1:
            raise UserError(f"validation size {val_size} must be >= 1 (a count) or in (0, 1)")
    elif isinstance(val_size, numbers.Real) and 0 < val_size < 1:
        n_val = max(1, round(n * float(val_size)))
    else:
        raise UserError(f"validation size {val_size!r} must be a fraction in (0, 1) "
                        "or a count >= 1")
    if n_val >= n:
        raise UserError(f"validation size {val_size} leaves no training images out of {n}; "
                        "use a smaller --val-size")
    # Both parts keep the random order, so "the first n images" of either (eval --n,
    # --train-size, the per-epoch robust check) is a random, class-balanced-in-expectation
    # subset even for folders, whose files come sorted by class.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_val], perm[n_val:]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, exact, from a histogram of the 256 values.

    A histogram needs no float copy of the data set (which would be 8 bytes per pixel).
    A constant channel gets std 1e-3 instead of 0 so that Normalize never divides by zero.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        p = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p /= p.sum()
        mean = float((p * values).sum())
        var = float((p * values**2).sum()) - mean**2
        means.append(mean)
        stds.append(max(math.sqrt(max(var, 0.0)), 1e-3))
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------- built-in sources

def _load_digits() -> _Source:
    """scikit-learn's 8x8 digits (shipped with it, no download); values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    train = ImageData(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target).long())
    # No augmentation: flips turn digits into other shapes, and a 1-pixel shift, the 8x8
    # version of CIFAR's 4-of-32 crop, cuts strokes off these tightly framed digits. With it,
    # 8 epochs left PGD training at 0.26 under autoattack-fast instead of 0.46, and Grad L2L
    # at 0.10 instead of 0.30 (3 seeds each; docs/results.md, "Grad L2L ablation").
    return _Source(train, None, [str(i) for i in range(10)], flip=False, crop_padding=0)


# spec -> (title for messages, torchvision class name, flip, crop_padding)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST", False, 2),
    "cifar10": ("CIFAR-10", "CIFAR10", True, 4),
    "cifar100": ("CIFAR-100", "CIFAR100", True, 4),
    "svhn": ("SVHN", "SVHN", False, 4),  # house numbers are digits: no flips
}


def _load_torchvision(kind: str, data_dir: Path, download: bool) -> _Source:
    """A torchvision data set, converted from its in-memory arrays (no per-image loop)."""
    from torchvision import datasets

    title, class_name, flip, crop_padding = _TORCHVISION[kind]
    cls = getattr(datasets, class_name)
    try:
        if kind == "svhn":
            parts = [cls(str(data_dir), split=s, download=download) for s in ("train", "test")]
        else:
            parts = [cls(str(data_dir), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError) as e:  # torchvision: RuntimeError("Dataset not found ...")
        if download:
            raise UserError(f"could not download {title} into '{data_dir}': {e}") from e
        # torchvision checks the md5 of each CIFAR and SVHN file (MNIST: that its files exist),
        # so a truncated or altered file ends here too; --download fetches it again.
        raise UserError(f"{title} not found under '{data_dir}', or its files are damaged; add --download "
                        "to fetch it (needs internet)") from e
    train, test = (_torchvision_arrays(kind, part) for part in parts)
    classes = list(getattr(parts[0], "classes", [str(i) for i in range(10)]))  # SVHN has none
    return _Source(train, test, classes, flip, crop_padding)


def _torchvision_arrays(kind: str, ds: object) -> ImageData:
    if kind == "mnist":  # uint8 tensor [N, 28, 28]
        return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.long())
    if kind == "svhn":  # uint8 array [N, 3, 32, 32]; torchvision already maps label 10 to 0
        return ImageData(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long())
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # CIFAR: [N, 32, 32, 3]
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.int64))


def _load_fake(arg: str) -> _Source:
    """Synthetic, learnable data: each class is a fixed random pattern plus per-image noise.

    Deterministic (fixed seed), so tests and smoke runs see the same images everywhere.
    """
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+):(\d+)", arg)
    if m is None:
        raise UserError(f"bad spec 'fake:{arg}'; the format is fake:CxHxW:K with C channels, "
                        "HxW pixels and K classes, e.g. fake:3x32x32:10")
    c, h, w, k = map(int, m.groups())
    if not (1 <= c <= 4 and 1 <= h <= 256 and 1 <= w <= 256 and 2 <= k <= 1000):
        raise UserError(f"bad spec 'fake:{arg}'; fake data needs 1-4 channels, sides of "
                        "1-256 pixels and 2-1000 classes, e.g. fake:3x32x32:10")
    gen = torch.Generator().manual_seed(0)
    patterns = torch.rand(k, c, h, w, generator=gen) * 255

    def make(n: int) -> ImageData:
        labels = torch.randperm(n, generator=gen) % k  # balanced classes in random order
        noise = torch.randn(n, c, h, w, generator=gen) * 48
        images = (patterns[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return ImageData(images, labels)

    train, test = make(FAKE_TRAIN), make(FAKE_TEST)
    # No augmentation: a crop would shift the class pattern, and a flip would mirror it.
    return _Source(train, test, [str(i) for i in range(k)], flip=False, crop_padding=0)


# ---------------------------------------------------------------- image folders

def _load_folder(root: Path, data_dir: Path, image_size: int | None, on_bad_image: str) -> _Source:
    """PATH/train/<class>/* (and optional PATH/test/<class>/*), decoded once, then cached.

    The cache (one safetensors file under data_dir/cache/) is keyed by the path, size and
    mtime of every image file plus image_size, so any change to the folder rebuilds it.
    """
    if not root.is_dir():
        raise UserError(f"folder '{root}' does not exist; folder:PATH expects "
                        "PATH/train/<class>/<image files>")
    if not (root / "train").is_dir():
        raise UserError(f"'{root}' has no train/ folder; folder:PATH expects "
                        "PATH/train/<class>/<image files> (and optionally PATH/test/<class>/...)")
    splits = {"train": _list_class_files(root / "train", on_bad_image)}
    classes = list(splits["train"])
    if len(classes) < 2:
        raise UserError(f"'{root / 'train'}' needs one subfolder per class, at least two; "
                        f"found {classes or 'none'}")
    if (root / "test").is_dir():
        splits["test"] = _list_class_files(root / "test", on_bad_image)
        if list(splits["test"]) != classes:
            raise UserError(f"the class folders of '{root / 'test'}' {list(splits['test'])} "
                            f"differ from those of '{root / 'train'}' {classes}; "
                            "use the same names")

    key = _cache_key(root, splits, image_size)
    path_hash = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    cache_file = data_dir / "cache" / f"folder-{path_hash}-{image_size or 'native'}.safetensors"
    cached = _read_cache(cache_file, key)
    if cached is None:
        tensors, skipped = _decode_folder(root, splits, image_size)
        _write_cache(cache_file, key, tensors, classes, skipped)
    else:
        tensors, skipped = cached

    if skipped and on_bad_image == "fail":
        rel, reason = skipped[0]
        raise UserError(f"cannot read image '{root / rel}' ({reason}); fix or remove it, "
                        "or pass --on-bad-image skip")
    if skipped:
        rel, reason = skipped[0]
        print(f"warning: skipped {len(skipped)} unreadable image file(s) under '{root}' "
              f"(first: {rel}: {reason})", file=sys.stderr)
    train = ImageData(tensors["train_images"], tensors["train_labels"])
    test = None
    if "test_images" in tensors:
        # Files come sorted by class: shuffled once, by a fixed seed, "the first N test images"
        # (eval --split test --n N) is a random, class-balanced-in-expectation subset, the same
        # on every run; the whole split's numbers do not depend on its order.
        order = torch.randperm(len(tensors["test_labels"]), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
        test = ImageData(tensors["test_images"][order], tensors["test_labels"][order])
    size = min(train.images.shape[-2:])
    return _Source(train, test, classes, flip=True, crop_padding=size // 8)


def _list_class_files(split_dir: Path, on_bad_image: str = "fail") -> dict[str, list[Path]]:
    """{class name: sorted image files}, recursing into subfolders but not symlinked ones.

    Hidden files and folders (.DS_Store, ._x.jpg, .ipynb_checkpoints) are not data. A class
    folder without image files is an error, or with on_bad_image="skip" left out (warning).
    """
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith("."))
    files = {}
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, f) for f in sorted(filenames)
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not found and on_bad_image == "skip":
            print(f"warning: left out class folder '{split_dir / name}': it has no image files",
                  file=sys.stderr)
            continue
        if not found:
            raise UserError(f"class folder '{split_dir / name}' has no image files "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove it, "
                            "or pass --on-bad-image skip")
        files[name] = found
    return files


def _cache_key(root: Path, splits: dict[str, dict[str, list[Path]]], image_size: int | None) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{root}\0{image_size}\n".encode())
    for files in splits.values():
        for path in (p for class_files in files.values() for p in class_files):
            try:
                st = path.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # e.g. a broken symlink: decoding will report it
                size = mtime = -1
            h.update(f"{path.relative_to(root).as_posix()}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _decode_image(path: Path, image_size: int | None) -> np.ndarray:
    """One file -> uint8 array, [H, W] for grayscale images, [H, W, 3] for everything else."""
    with Image.open(path) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels is over the limit")
        im = im.convert("L") if im.mode in ("L", "1") else im.convert("RGB")
        if image_size is not None:
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(im)


def _decode_or_error(path: Path, image_size: int | None) -> np.ndarray | str:
    try:
        return _decode_image(path, image_size)
    except Exception as e:  # any failure (PIL raises OSError, SyntaxError, ...) = bad file
        return f"{type(e).__name__}: {e}".strip()


def _decode_folder(root: Path, splits: dict[str, dict[str, list[Path]]],
                   image_size: int | None) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Decode every file in threads (PIL releases the GIL); return tensors and skipped files."""
    jobs = [(split, label, path) for split, files in splits.items()
            for label, class_files in enumerate(files.values()) for path in class_files]
    with warnings.catch_warnings(), ThreadPoolExecutor() as pool:
        # a DecompressionBombWarning (a huge image) counts as a bad file, like the error
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        results = list(pool.map(_decode_or_error, [p for _, _, p in jobs],
                                [image_size] * len(jobs)))

    skipped, good = [], []  # good: (split, label, path, array)
    for (split, label, path), result in zip(jobs, results, strict=True):
        if isinstance(result, str):
            skipped.append([path.relative_to(root).as_posix(), result])
        else:
            good.append((split, label, path, result))
    present = {(split, label) for split, label, _, _ in good}
    for split, files in splits.items():
        for label, name in enumerate(files):
            if (split, label) not in present:
                raise UserError(f"no readable images in '{root / split / name}'")
    sizes = {r.shape[:2]: p for _, _, p, r in good}
    if len(sizes) > 1:
        examples = ", ".join(f"{p.relative_to(root)} is {w}x{h}"
                             for (h, w), p in list(sizes.items())[:2])
        raise UserError(f"images under '{root}' have different sizes ({examples}); "
                        "pass --image-size N to resize them all to NxN, or --loader stream --image-size N "
                        "to read them as they are and crop NxN")
    # One channel only if every image is grayscale; otherwise gray ones are replicated to RGB.
    gray = all(r.ndim == 2 for _, _, _, r in good)
    tensors = {}
    for split in splits:
        arrays = [r for s, _, _, r in good if s == split]
        if gray:
            images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        else:
            arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_images"] = images
        tensors[f"{split}_labels"] = torch.tensor([lab for s, lab, _, _ in good if s == split],
                                                  dtype=torch.int64)
    return tensors, skipped


def _read_cache(path: Path, key: str) -> tuple[dict[str, torch.Tensor], list[list[str]]] | None:
    """The cached tensors and skipped files, or None if absent, stale or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        skipped = json.loads(meta["skipped"])
        if not {"train_images", "train_labels"} <= tensors.keys():
            return None
        return tensors, skipped
    except FileNotFoundError:
        return None
    except Exception:  # a truncated or corrupt cache is simply rebuilt
        return None


def _write_cache(path: Path, key: str, tensors: dict[str, torch.Tensor], classes: list[str],
                 skipped: list[list[str]]) -> None:
    """Write atomically (temp file + os.replace), so a crash or a parallel run never leaves
    a half-written cache. A cache that cannot be written only costs time, so it only warns."""
    meta = {"key": key, "classes": json.dumps(classes), "skipped": json.dumps(skipped)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not write the image cache '{path}': {e}", file=sys.stderr)


# ---------------------------------------------------------------- streamed sets

def _file_split(files: dict[str, list[Path]], size: int) -> FileData:
    paths = [str(p) for class_files in files.values() for p in class_files]
    labels = [k for k, class_files in enumerate(files.values()) for _ in class_files]
    return FileData(paths, torch.tensor(labels, dtype=torch.int64), size)


def _streamed(name: str, train_all: FileData, test: FileData | None, classes: list[str],
              val_size: float | int, split_seed: int, reason: str,
              stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
              words: list[str] | None = None) -> Dataset:
    """A Dataset of FileData splits: val carved from train as for in-memory sets, the test
    split in the fixed order of TEST_ORDER_SEED (as a folder's in memory)."""
    val_idx, train_idx = _split_indices(len(train_all), val_size, split_seed)
    train, val = train_all.take(train_idx), train_all.take(val_idx)
    if test is not None:
        test = test.take(torch.randperm(len(test), generator=torch.Generator().manual_seed(TEST_ORDER_SEED)))
    mean, std = stats if stats is not None else estimated_stats(train)
    return Dataset(name=name, train=train, val=val, test=test, classes=classes, mean=mean, std=std, flip=True,
                   crop_padding=0, loader="stream", loader_reason=reason, class_words=words)


def _maybe_stream_folder(root: Path, name: str, image_size: int | None, on_bad_image: str, loader: str,
                         device: torch.device | str | None, val_size: float | int,
                         split_seed: int) -> Dataset | None:
    """folder:PATH as a streamed Dataset, or None where it is to be decoded into memory."""
    if loader == "memory" and not root.is_dir():
        return None  # _load_folder says what is wrong
    if not (root / "train").is_dir():
        return None
    train_files = _list_class_files(root / "train", on_bad_image)
    n = sum(len(f) for f in train_files.values())
    if (root / "test").is_dir():
        n += sum(len(f) for f in _list_class_files(root / "test", on_bad_image).values())
    if len(train_files) < 2 or n == 0:
        return None  # _load_folder says what is wrong
    first = next(p for f in train_files.values() for p in f)
    size = image_size
    if size is None:
        header = check_file(str(first))
        size = min(header) if isinstance(header, tuple) else 1
    kind, reason = choose_loader(loader, n * 3 * size * size, device, name)
    if kind == "memory":
        return None
    if image_size is None and loader == "stream":
        raise UserError(f"--loader stream crops the images of {name} to one size; give it with --image-size N")
    if image_size is None:
        raise UserError(f"{name} is too large to hold in memory ({reason}), so it streams, cropped to one size; "
                        "give that size with --image-size N")
    splits = {"train": train_files}
    if (root / "test").is_dir():
        splits["test"] = _list_class_files(root / "test", on_bad_image)
        if list(splits["test"]) != list(train_files):
            raise UserError(f"the class folders of '{root / 'test'}' differ from those of '{root / 'train'}'; "
                            "use the same names")
    test = _file_split(splits["test"], image_size) if "test" in splits else None
    return _streamed(name, _file_split(train_files, image_size), test, list(train_files), val_size, split_seed,
                     reason)


def _load_imagenet(root: Path, name: str, image_size: int | None, on_bad_image: str, loader: str,
                   device: torch.device | str | None, val_size: float | int, split_seed: int) -> Dataset:
    """imagenet:PATH (see `stream.list_imagenet`): ImageNet's official val folder is our test
    split; val is carved from train by split_seed as for every set. Mean and std are the
    standard ImageNet statistics, not a pass over the images. Streamed, or decoded with
    the eval transform into memory where it fits (auto) or is asked for (memory)."""
    if not root.is_dir():
        raise UserError(f"folder '{root}' does not exist; imagenet:PATH expects PATH/train/<wnid>/*.JPEG and "
                        "PATH/val/<wnid>/*.JPEG")
    size = image_size or IMAGENET_SIZE
    wnids, words, train_files, val_files = list_imagenet(root)
    train_all, test = _file_split(train_files, size), _file_split(val_files, size)
    kind, reason = choose_loader(loader, (len(train_all) + len(test)) * 3 * size * size, device, name)
    data = _streamed(name, train_all, test, wnids, val_size, split_seed, reason,
                     stats=(IMAGENET_MEAN, IMAGENET_STD), words=words)
    if kind == "memory":  # every image through the eval transform, once
        data = check_streamed(data, on_bad_image, ("train", "val", "test"))
        for split in ("train", "val", "test"):
            files = getattr(data, split)
            setattr(data, split, ImageData(decode_all(files), files.labels))
        data.loader, data.crop_padding = "memory", size // 8
    return data


def check_streamed(data: Dataset, on_bad_image: str, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """A streamed set with the unreadable files of `splits` left out (warning) or refused
    (UserError under on_bad_image="fail"), by `stream.drop_bad`; in-memory sets unchanged.
    Before training: the batches then never meet a file that is known to be bad."""
    if not data.streamed:
        return data
    root = data.name.partition(":")[2]
    for split in splits:
        files = getattr(data, split)
        if files is not None:
            setattr(data, split, drop_bad(files, root, on_bad_image, split))
    return data


def in_memory(images: ImageData | FileData, on_bad_image: str = "skip") -> ImageData:
    """A split as uint8 tensors: a streamed one decoded with the eval transform (only its
    readable files, by `stream.drop_bad`), e.g. the first N images eval attacks."""
    if isinstance(images, ImageData):
        return images
    images = drop_bad(images, Path(images.paths[0]).parent.parent if images.paths else "", on_bad_image, "evaluated")
    return ImageData(decode_all(images), images.labels)


def make_loader(images: ImageData | FileData, batch_size: int, device: torch.device | str, *,
                workers: int | None = None, on_bad_image: str = "skip",
                **kwargs: object) -> DeviceLoader | StreamLoader:
    """The loader of a split: `DeviceLoader` for one in memory, `StreamLoader` for files.
    `kwargs` are DeviceLoader's (shuffle, drop_last, augment, crop_padding, flip, seed,
    rank, world_size); a StreamLoader ignores crop_padding (it crops with RandomResizedCrop)."""
    if isinstance(images, ImageData):
        return DeviceLoader(images, batch_size, device, **kwargs)
    kwargs.pop("crop_padding", None)
    return StreamLoader(images, batch_size, device, workers=workers, on_bad_image=on_bad_image, **kwargs)


# ---------------------------------------------------------------- loader

def _seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, identical on every machine and run (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceLoader:
    """Batches from a data set held entirely on `device` as uint8.

    Each batch is one index operation on the device, converted to float32 in [0, 1] and,
    with `augment`, randomly cropped (zero padding `crop_padding`) and flipped (if `flip`)
    as a whole batch. Order and augmentation are pure functions of (seed, epoch): call
    `set_epoch` before each epoch; `iterate(start_batch)` resumes mid-epoch with exactly
    the batches a full pass would have given. With `world_size` > 1 every rank sees the
    same permutation and takes every world_size-th sample of it (after trimming the
    permutation so all ranks get the same number of batches).
    """

    def __init__(self, data: ImageData, batch_size: int, device: torch.device | str, *,
                 shuffle: bool = True, drop_last: bool = True, augment: bool = False,
                 crop_padding: int = 0, flip: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or crop_padding < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: batch_size={batch_size}, crop_padding="
                             f"{crop_padding}, rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # stays uint8: 4x less memory than float
        self.labels = data.labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.per_rank = len(data) // world_size
        rounding = math.floor if drop_last else math.ceil
        self.n_batches = rounding(self.per_rank / batch_size)
        if self.n_batches == 0:
            raise UserError(f"{len(data)} images give no batch of {batch_size} per rank "
                            f"({world_size} rank(s)); use a smaller --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start_batch: int = 0, *, indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images float32 [B, C, H, W] in [0, 1], labels int64 [B]) on the device, from batch
        `start_batch` on. Skipped batches cost nothing: each batch's randomness has its own seed.
        `indices`: also the images' indices in the data set (int64 [B] on the device; for
        methods with a per-image memory), a slice of the order already there: no extra copy."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        return self._batches(self.order().to(self.device), start_batch, self.epoch, indices)

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (CPU)."""
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(_seed("order", self.seed, self.epoch))
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def _batches(self, order: torch.Tensor, start: int, epoch: int,
                 indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment and (self.crop_padding or self.flip):
                seed = _seed("augment", self.seed, epoch, self.rank, b)
                images = self._augment(images, torch.Generator().manual_seed(seed))
            yield (images.float().div_(255), self.labels[idx], *((idx,) if indices else ()))

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop + flip of a whole uint8 batch as one gather.

        The random numbers are drawn on the CPU (same results on any device). Image i is
        cut from the zero-padded batch at rows dy[i] + 0..H-1 and columns dx[i] + 0..W-1;
        a flip just reads those columns right to left.
        """
        b, c, h, w = x.shape
        p = self.crop_padding
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
        flip = torch.rand(b, 1, generator=gen) < 0.5
        if not self.flip:
            flip.zero_()
        j = torch.arange(w)
        rows = dy + torch.arange(h)  # [B, H]
        cols = dx + torch.where(flip, w - 1 - j, j)  # [B, W]
        padded = F.pad(x, (p, p, p, p)) if p else x
        batch_idx = torch.arange(b)[:, None, None, None]
        chan_idx = torch.arange(c)[None, :, None, None]
        rows, cols = rows[:, None, :, None], cols[:, None, None, :]
        return padded[tuple(t.to(self.device) for t in (batch_idx, chan_idx, rows, cols))]
