"""Data sets read from image files batch by batch, for sets that do not fit in memory.

A `FileData` split is a list of image files and their labels; `StreamLoader` decodes them
in `torch.utils.data.DataLoader` workers (pinned memory, prefetch) with torchvision's
decoders (libjpeg-turbo), falling back to PIL for what they cannot read (CMYK JPEG,
palette PNG, BMP, TIFF, ...). Grayscale images become RGB and alpha is dropped.

Training batches get the ImageNet recipe, `RandomResizedCrop(size)` + horizontal flip
(torchvision.transforms.v2); evaluation batches `Resize(round(size / 0.875))` +
`CenterCrop(size)`, RobustBench's ImageNet protocol (Resize 256, CenterCrop 224). Batches
leave the workers as uint8 and become float32 in [0, 1] on the device, as `DeviceLoader`'s
do. Order and augmentation are pure functions of (seed, epoch, index): the permutation of
an epoch as in `DeviceLoader`, and each sample's crop and flip from its own seed, so a run
resumed mid-epoch (`iterate(start_batch)`) sees exactly the batches of an uninterrupted one,
and a sample is augmented alike whatever the number of ranks.

Unreadable files: `check_files` reads every file's header and checks that a JPEG or PNG
file ends with its end marker (a cheap test for truncation) before training starts, so a
bad file is left out (`on_bad_image="skip"`, with a warning) or refused (`"fail"`) before
anything is written. A file that passes that check but still fails to decode in a worker is
replaced by the next readable sample of the set (a deterministic substitute, so the batch
stays a function of (seed, epoch, index)) with a warning, or ends the run under "fail".
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from learn2defend.errors import UserError

RESIZE_RATIO = 0.875  # eval: Resize(size / 0.875) + CenterCrop(size), e.g. 256 -> 224
STATS_SAMPLE = 512  # images decoded (eval transform, fixed seed) to estimate a streamed folder's mean/std
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the standard ImageNet statistics (torchvision's models use them)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
MEMORY_LIMIT_ENV = "LEARN2DEFEND_MEMORY_LIMIT"  # bytes: overrides the memory --loader auto may use
MEMORY_FRACTION = 0.5  # --loader auto keeps a set in memory if it takes at most this share of what is free
MAX_SUBSTITUTES = 16  # files tried after one that fails to decode in a worker


@dataclass
class FileData:
    """One split as image files: `paths` and int64 `labels` [N]; decoded batch by batch to
    uint8 [3, size, size] (or [1, size, size] with channels=1)."""

    paths: list[str]
    labels: torch.Tensor
    size: int
    channels: int = 3

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def take(self, idx: torch.Tensor | list[int]) -> FileData:
        """The files at positions `idx`, in that order."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return FileData([self.paths[i] for i in idx.tolist()], self.labels[idx], self.size, self.channels)

    def head(self, n: int) -> FileData:
        return FileData(self.paths[:n], self.labels[:n], self.size, self.channels)


# ---------------------------------------------------------------- decoding

def read_image(path: str, channels: int = 3) -> torch.Tensor:
    """One file -> uint8 [channels, H, W]: torchvision's decoder (libjpeg-turbo for JPEG),
    PIL where it cannot read the file. Gray becomes RGB for channels=3; alpha is dropped."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            image = decode_image(path, mode=mode)
        if image.dtype == torch.uint8 and image.shape[0] == channels:
            return image
    except Exception:  # noqa: BLE001 - a format or variant libjpeg/libpng cannot read here: PIL tries
        pass
    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        array = np.asarray(im)
    tensor = torch.from_numpy(array.copy())
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)


_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}


def check_file(path: str) -> tuple[int, int] | str:
    """(width, height) from the file's header, or why the file is unreadable: no image PIL
    knows, over PIL's pixel limit, or a JPEG or PNG that does not end with its end marker
    (truncated). Reads the header and the last bytes only, not the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            return f"{width}x{height} pixels is over PIL's limit"
        marker = _END_MARKERS.get(Path(path).suffix.lower())
        if marker is not None and im.format in ("JPEG", "PNG"):
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 64))
                tail = f.read()
            # JPEG writers may pad after the end marker; the marker must be among the last bytes
            if marker not in tail:
                return f"truncated {im.format} file (no end marker)"
        return (width, height)
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
        return f"{type(e).__name__}: {e}".strip()


def check_files(paths: list[str]) -> list[tuple[int, int] | str]:
    """`check_file` of every path, in threads (file reads release the GIL)."""
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 4)) as pool:
        return list(pool.map(check_file, paths, chunksize=64))


def drop_bad(data: FileData, root: str | Path, on_bad_image: str, what: str) -> FileData:
    """`data` without the files `check_file` finds unreadable: left out with one warning
    under on_bad_image="skip", UserError under "fail" (before any work starts)."""
    results = check_files(data.paths)
    bad = [(p, r) for p, r in zip(data.paths, results, strict=True) if isinstance(r, str)]
    if not bad:
        return data
    if on_bad_image == "fail":
        path, reason = bad[0]
        raise UserError(f"cannot read image '{path}' ({reason}); fix or remove it, or pass --on-bad-image skip")
    path, reason = bad[0]
    print(f"warning: skipped {len(bad)} unreadable image file(s) of the {what} split under '{root}' "
          f"(first: {path}: {reason})", file=sys.stderr)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    if not keep:
        raise UserError(f"no readable images in the {what} split under '{root}'")
    return data.take(keep)


def train_transform(size: int, flip: bool):
    """RandomResizedCrop(size) (+ horizontal flip): the ImageNet training recipe, on uint8 tensors."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int):
    """Resize(round(size / 0.875)) + CenterCrop(size): RobustBench's ImageNet protocol at 224."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(round(size / RESIZE_RATIO), antialias=True), v2.CenterCrop(size)])


def _seed(*parts: object) -> int:
    from learn2defend.data import _seed as seed

    return seed(*parts)


class _Samples(torch.utils.data.Dataset):
    """Map-style: key (index, epoch) -> (uint8 [C, S, S], label, path of a file that failed
    to decode, or ""). The augmentation's random numbers come from a seed of (seed, epoch,
    index) under a forked RNG, so neither the worker nor the main process RNG matters."""

    def __init__(self, data: FileData, augment: bool, flip: bool, seed: int) -> None:
        self.data, self.augment, self.seed = data, augment, seed
        self.transform = train_transform(data.size, flip) if augment else eval_transform(data.size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        index, epoch = key
        n, failed = len(self.data), ""
        for k in range(MAX_SUBSTITUTES + 1):
            j = (index + k) % n  # the next file stands in for one that cannot be decoded
            try:
                image = read_image(self.data.paths[j], self.data.channels)
                break
            except Exception:  # noqa: BLE001
                failed = failed or self.data.paths[j]
        else:
            raise RuntimeError(f"{MAX_SUBSTITUTES + 1} image files in a row cannot be decoded, from "
                               f"'{self.data.paths[index]}' on")
        with torch.random.fork_rng(devices=[]):
            if self.augment:
                torch.manual_seed(_seed("stream", self.seed, epoch, index))
            image = self.transform(image)
        return image, int(self.data.labels[j]), failed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers, one thread each: the processes are the parallelism


class StreamLoader:
    """Batches decoded from files by DataLoader workers; the interface of `DeviceLoader`
    (set_epoch, __len__, iterate(start_batch), order), the same order and sharding.

    `augment`: the training transform, else the eval one. Each rank reads only its share of
    the epoch (every world_size-th sample of the shared permutation). A file that fails to
    decode is replaced by the next one (warning) or, with on_bad_image="fail", ends the
    iteration with a UserError.
    """

    def __init__(self, data: FileData, batch_size: int, device: torch.device | str, *,
                 shuffle: bool = True, drop_last: bool = True, augment: bool = False, flip: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int | None = None,
                 on_bad_image: str = "skip", prefetch: int = 4) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.data, self.device = data, torch.device(device)
        self.labels = data.labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.flip, self.seed, self.rank, self.world_size = augment, flip, seed, rank, world_size
        self.workers = default_workers() if workers is None else workers
        self.on_bad_image, self.prefetch = on_bad_image, prefetch
        self.samples = _Samples(data, augment, flip, seed)
        self.epoch, self.replaced = 0, 0
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

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (CPU), as `DeviceLoader.order`."""
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(_seed("order", self.seed, self.epoch))
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def iterate(self, start_batch: int = 0, *, indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images float32 [B, C, S, S] in [0, 1], labels int64 [B]) on the device, from batch
        `start_batch` on; the batches before it are not decoded. `indices`: also the images'
        indices in the split (int64 [B] on the device), as `DeviceLoader.iterate`."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        order, b = self.order(), self.batch_size
        listed = order.tolist()
        batches = [[(i, self.epoch) for i in listed[k * b : (k + 1) * b]] for k in range(start_batch, len(self))]
        if not indices:
            return self._batches(batches)
        on_device = order.to(self.device)  # one copy per epoch; each batch's indices are a slice of it
        slices = (on_device[k * b : (k + 1) * b] for k in range(start_batch, len(self)))
        return ((*batch, idx) for batch, idx in zip(self._batches(batches), slices, strict=True))

    def _batches(self, batches: list[list[tuple[int, int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not batches:
            return
        workers = min(self.workers, len(batches))
        loader = torch.utils.data.DataLoader(
            self.samples, batch_sampler=batches, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers else None, worker_init_fn=_worker_init if workers else None,
        )
        for images, labels, failed in loader:
            bad = [p for p in failed if p]
            if bad:
                self._bad(bad)
            yield (images.to(self.device, non_blocking=True).float().div_(255),
                   labels.to(self.device, non_blocking=True))

    def _bad(self, paths: list[str]) -> None:
        if self.on_bad_image == "fail":
            raise UserError(f"cannot decode image '{paths[0]}'; fix or remove it, or pass --on-bad-image skip")
        self.replaced += len(paths)
        print(f"warning: {len(paths)} image file(s) failed to decode and were replaced by the next file "
              f"({self.replaced} so far; first: {paths[0]})", file=sys.stderr)


def default_workers() -> int:
    """Decode workers when none are given: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def decode_all(data: FileData, workers: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Every image of `data` with the eval transform, uint8 [N, C, S, S] on the CPU (for
    evaluating the first N images of a streamed split)."""
    loader = StreamLoader(data, min(batch_size, max(1, len(data))), "cpu", shuffle=False, drop_last=False,
                          workers=0 if workers is None and len(data) <= batch_size else workers)
    parts = [(x * 255).round_().to(torch.uint8) for x, _ in loader]
    return torch.cat(parts) if parts else torch.empty(0, *data.image_shape, dtype=torch.uint8)


def estimated_stats(data: FileData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, estimated from at most STATS_SAMPLE images
    (a fixed-seed sample, eval transform): a full pass over a streamed set costs an epoch."""
    n = len(data)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE]
    x = decode_all(data.take(pick)).double().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ---------------------------------------------------------------- which loader

def available_memory(device: torch.device | str | None = None) -> tuple[int, str]:
    """(bytes a whole data set may take, what that limit is), for --loader auto: MEMORY_FRACTION
    of the free host memory (os.sysconf), and of the free device memory on CUDA, whichever is
    less; the environment variable LEARN2DEFEND_MEMORY_LIMIT (bytes) replaces it."""
    given = os.environ.get(MEMORY_LIMIT_ENV)
    if given:
        try:
            return int(float(given)), f"{MEMORY_LIMIT_ENV}={given}"
        except ValueError:
            raise UserError(f"{MEMORY_LIMIT_ENV} must be a number of bytes, not {given!r}") from None
    try:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        host = 8 << 30
    limit, what = int(host * MEMORY_FRACTION), "free host memory"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        if free * MEMORY_FRACTION < limit:
            limit, what = int(free * MEMORY_FRACTION), f"free memory of {device}"
    return limit, f"{MEMORY_FRACTION:g} of the {what}"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def choose_loader(mode: str, n_bytes: int, device: torch.device | str | None, name: str) -> tuple[str, str]:
    """("memory" or "stream", why) for `--loader mode` and a set of `n_bytes` decoded.
    UserError for --loader memory where the set cannot fit."""
    limit, what = available_memory(device)
    if mode == "stream":
        return "stream", "--loader stream"
    if mode == "memory":
        if n_bytes > limit:
            raise UserError(f"{name} takes {gigabytes(n_bytes)} decoded, more than the {gigabytes(limit)} "
                            f"--loader memory may use ({what}); use --loader stream (or auto)")
        return "memory", "--loader memory"
    if n_bytes > limit:
        return "stream", f"auto: {gigabytes(n_bytes)} decoded > {gigabytes(limit)} ({what})"
    return "memory", f"auto: {gigabytes(n_bytes)} decoded fits in {gigabytes(limit)} ({what})"


# ---------------------------------------------------------------- ImageNet

def list_imagenet(root: Path) -> tuple[list[str], list[str] | None, dict[str, list[Path]], dict[str, list[Path]]]:
    """ILSVRC-2012 as torchvision's ImageNet reads it: root/train/<wnid>/*.JPEG and
    root/val/<wnid>/*.JPEG. Returns (wnids, their words or None, train files by wnid, val
    files by wnid). Words come from root/LOC_synset_mapping.txt (Kaggle's devkit file:
    "n01440764 tench, Tinca tinca") where it exists. UserError for a missing or flat val folder."""
    from learn2defend.data import _list_class_files

    if not (root / "train").is_dir():
        raise UserError(f"'{root}' has no train/ folder; imagenet:PATH expects PATH/train/<wnid>/*.JPEG and "
                        "PATH/val/<wnid>/*.JPEG (the ILSVRC-2012 layout torchvision's ImageNet reads)")
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise UserError(f"'{root}' has no val/ folder; imagenet:PATH expects PATH/val/<wnid>/*.JPEG")
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(val_dir)):
        raise UserError(f"'{val_dir}' holds no class folders; move each validation image into val/<wnid>/, e.g. "
                        "with valprep.sh (github.com/soumith/imagenetloader.torch) or torchvision's "
                        "ImageNet(root, split='val'), which sorts them with the devkit's ground truth")
    train = _list_class_files(root / "train", "fail")
    val = _list_class_files(val_dir, "fail")
    wnids = list(train)
    if len(wnids) < 2:
        raise UserError(f"'{root / 'train'}' needs one folder per wnid, at least two; found {wnids or 'none'}")
    if list(val) != wnids:
        raise UserError(f"the wnid folders of '{val_dir}' differ from those of '{root / 'train'}' "
                        f"({len(val)} vs {len(wnids)}); use the same classes")
    words = None
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        found = {}
        for line in mapping.read_text().splitlines():
            wnid, _, text = line.strip().partition(" ")
            found[wnid] = text.strip()
        words = [found.get(w, "") for w in wnids]
    return wnids, words, train, val
