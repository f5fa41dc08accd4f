"""Loader throughput (a benchmark, not a test): the in-memory DeviceLoader on CIFAR-size data,
and the streaming loader on 224-pixel crops of JPEGs written to a temporary folder.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/bench_loader.py [--device cpu] [--stream]

Without --stream only the DeviceLoader part runs, so the same command measures the code of a
version without the streaming loader (before/after). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from learn2defend.data import DeviceLoader, ImageData


def _best_rate(run, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - started))
    return best


def device_loader(device: str, n: int = 50_000, batch: int = 512, repeats: int = 3) -> dict:
    """Batches per second of one epoch over fake 3x32x32 uint8 data, augmented (crop 4 + flip)."""
    gen = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                     torch.randint(0, 10, (n,), generator=gen))
    loader = DeviceLoader(data, batch, device, augment=True, crop_padding=4, flip=True)

    def epoch() -> int:
        count = 0
        for _ in loader:
            count += 1
        if loader.device.type == "cuda":
            torch.cuda.synchronize()
        return count

    epoch()  # warm-up
    return {"batches_per_s": round(_best_rate(epoch, repeats), 1), "images": n, "batch": batch}


def write_jpegs(folder: Path, n: int = 512) -> None:
    """n smooth random 500x375 RGB JPEGs (quality 90), two classes."""
    rng = np.random.default_rng(0)
    for k in range(n):
        d = folder / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BILINEAR).save(d / f"{k}.jpg", quality=90)


def stream_loader(device: str, workers_list: tuple[int, ...] = (0, 1, 2), batch: int = 64) -> dict:
    """Images per second of one epoch of the streaming loader (RandomResizedCrop 224 + flip)."""
    from learn2defend.data import FileData, StreamLoader

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp))
        paths = sorted(str(p) for p in Path(tmp).rglob("*.jpg"))
        data = FileData(paths, torch.tensor([int(Path(p).parent.name[1:]) for p in paths]), 224)
        for workers in workers_list:
            loader = StreamLoader(data, batch, device, augment=True, flip=True, workers=workers)

            def epoch(loader: StreamLoader = loader) -> int:
                return sum(len(y) for _, y in loader)

            rate = _best_rate(epoch, 2)
            results[f"workers={workers}"] = {"images_per_s": round(rate, 1),
                                             "per_worker": round(rate / max(workers, 1), 1)}
    return {"jpegs": len(paths), "size": "500x375 -> 224", "batch": batch, **results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--stream", action="store_true", help="also time the streaming loader")
    args = p.parse_args()
    torch.manual_seed(0)
    result = {"torch_threads": torch.get_num_threads(), "device_loader": device_loader(args.device)}
    if args.stream:
        result["stream_loader"] = stream_loader(args.device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
