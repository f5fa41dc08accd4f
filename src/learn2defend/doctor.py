"""`learn2defend doctor`: what this machine is, whether training runs on it, and how fast
each method is with each speed switch. One command for the day a GPU is at hand; it is
also correct on the CPU.

It reports the versions (Python, torch, CUDA, cuDNN), the device and whether it supports
bf16 and TF32, then benchmarks every method (`learn2defend.bench`, the very steps training
runs) once per *variant*: float32, then each speed switch alone (bf16, fp16, channels_last,
compile, and on CUDA tf32 and cudnn_benchmark), then all of them together ("fast"). For
each method and variant: seconds per step, images per second, multiply-accumulates per
second, the ratio to the MAC floor (the step's MACs by the cost model of
docs/performance.md at the rate the plain step achieves), and the speed-up over float32.

First it times the device's own dense matrix multiply (`bench.roofline`: torch.mm in
float32 and bf16, a second each), the practical roofline; each method's MAC rate is also
given as a fraction of it (`roofline_fraction`; bf16's under bf16/fp16 autocast). The
combinations tensor cores are built for, bf16 + channels_last and bf16 + channels_last +
compile, are timed at each of `combination_batch_sizes` (128 and 512 on CUDA), with each
step's compilation reported apart from its steps (`compile_seconds`).

On CUDA it also trains, as checks that the whole loop works there: one epoch of grad-l2l
on `fake:3x32x32:10` (CIFAR-sized) in float32 and with the switches, and one epoch under
`torchrun --nproc_per_node 1` with the nccl backend (gloo on the CPU), as a subprocess.

`max_seconds` bounds the whole run: no new variant or check starts after it, and a
benchmark in progress starts no new round (a compilation under way still finishes). What
was left out is listed with the reason.

Nothing here imports pyautoattack, torchattacks or tensorboard, and nothing needs the
package to be installed: `PYTHONPATH=src python3 -m learn2defend doctor` works from a
source tree.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bench import BENCH_METHODS, BenchConfig, bench, peak_for, roofline, roofline_fraction, switches
from .config import ATTACKER_WIDTH_HELP, DATA_DIR_HELP, DEVICE_HELP, TrainConfig, option
from .errors import UserError
from .models import list_models
from .runs import resolve_device
from .version import __version__

DATASET = "fake:3x32x32:10"  # CIFAR-shaped and deterministic; needs no download
FLOAT32 = "float32"
FAST = "fast"
# Each variant: the switches it turns on (BenchConfig/TrainConfig field names).
SWITCH_VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "channels_last": {"channels_last": True},
    "tf32": {"tf32": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "compile": {"compile": True},
}
CUDA_ONLY = ("tf32", "cudnn_benchmark")
# Timed at each of DoctorConfig.combination_batch_sizes, as "NAME@BATCH".
COMBINATIONS: dict[str, dict[str, Any]] = {
    "bf16+channels_last": {"amp": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
VARIANTS = (FLOAT32, *SWITCH_VARIANTS, FAST, *COMBINATIONS)


@dataclass
class DoctorConfig:
    """What doctor benchmarks and checks. Each field is also an option of `learn2defend doctor`
    (config.option)."""

    device: str = option("auto", help=DEVICE_HELP)
    model: str | None = option(None, help="classifier to bench (default: wrn-34-4 on CUDA, smallcnn on the CPU)")
    batch_size: int | None = option(None, help="images per step (default: 128 on CUDA, 32 on the CPU)")
    steps: int = option(5, help="timed rounds per variant; the median is reported")
    warmup: int = option(2, help="untimed rounds first (compilation and cuDNN's search happen there)")
    methods: list[str] = option(default_factory=lambda: list(BENCH_METHODS),
                                help="comma-separated (default: every method, and attacker-only)")
    variants: list[str] | None = option(None, help=f"comma-separated, from: {', '.join(VARIANTS)} "
                                        "(default: all that apply to the device)")
    attacker_width: float = option(1.0, help=ATTACKER_WIDTH_HELP)
    max_seconds: float = option(240.0, help="no new variant or check starts after this many seconds "
                                "(a compilation under way finishes)")
    checks: bool | None = option(None, help="also train a short epoch in float32, one with every switch, and one "
                                 "under torchrun (default: on CUDA only)")
    # fake data: 2048 training images, of which 256 are held out for validation
    epoch_images: int = option(1792, help="training images of those epochs")
    data_dir: str = option("data", help=DATA_DIR_HELP)
    threads: int | None = option(None, help="CPU threads (default: torch's, one per core)")
    combination_batch_sizes: list[int] | None = option(
        None, help="batch sizes of the bf16+channels_last(+compile) variants (default: 128,512 on CUDA, "
        "--batch-size on the CPU)")
    roofline_seconds: float = option(1.0, help="seconds per dtype timing the device's dense matmul rate (0: skip)")

    def validate(self) -> None:
        if self.model is not None and not self.model.startswith("timm:") and self.model not in list_models():
            raise UserError(f"unknown model '{self.model}'; choose one of: {', '.join(list_models())}")
        for name in self.variants or []:
            if name not in VARIANTS:
                raise UserError(f"unknown variant '{name}'; choose from: {', '.join(VARIANTS)}")
        if not (self.max_seconds >= 0):
            raise UserError(f"--max-seconds must be >= 0, got {self.max_seconds}")
        if not isinstance(self.epoch_images, int) or not 2 <= self.epoch_images <= 1792:
            raise UserError(f"--epoch-images must be an integer in [2, 1792] (the fake data's training images), "
                            f"got {self.epoch_images}")
        for b in self.combination_batch_sizes or []:
            if not isinstance(b, int) or b < 1:
                raise UserError(f"--combination-batch-sizes must be integers >= 1, got {b}")
        # methods, steps, warmup, batch size, threads, roofline seconds: BenchConfig.validate, as bench
        self.bench_config(torch.device("cpu"), {}).validate()

    def bench_config(self, device: torch.device, switches: dict[str, Any], batch_size: int | None = None
                     ) -> BenchConfig:
        cuda = device.type == "cuda"
        return BenchConfig(
            model=self.model or ("wrn-34-4" if cuda else "smallcnn"), dataset=DATASET,
            batch_size=batch_size or self.batch_size or (128 if cuda else 32), steps=self.steps, warmup=self.warmup,
            methods=list(self.methods), attacker_width=self.attacker_width, device=str(device),
            data_dir=self.data_dir, threads=self.threads, roofline_seconds=0, **switches,
        )

    def combination_batches(self, device: torch.device) -> list[int]:
        """The batch sizes the combinations are timed at."""
        if self.combination_batch_sizes:
            return list(self.combination_batch_sizes)
        return [128, 512] if device.type == "cuda" else [self.bench_config(device, {}).batch_size]


def doctor(config: DoctorConfig) -> dict[str, Any]:
    """Run every check and benchmark that fits in `config.max_seconds`; return the report."""
    config.validate()
    started = time.monotonic()
    deadline = started + config.max_seconds
    device = resolve_device(config.device)
    report: dict[str, Any] = {"environment": environment(device), "variants": {}, "skipped": {}}
    report["roofline"] = _roofline(config, device)
    checks = device.type == "cuda" if config.checks is None else config.checks
    for name in config.variants or VARIANTS:
        batches = config.combination_batches(device) if name in COMBINATIONS else [None]
        for batch in batches:
            key = name if batch is None else f"{name}@{batch}"
            if name in CUDA_ONLY and device.type != "cuda":
                report["skipped"][key] = "CUDA only"
            elif name != FLOAT32 and time.monotonic() > deadline:
                report["skipped"][key] = f"the --max-seconds {config.max_seconds:g} were spent"
            else:
                report["variants"][key] = _bench_variant(config, device, name, deadline, batch)
                _log(f"{key}: {report['variants'][key].get('seconds', 0):g} s")
        if name == FLOAT32 and checks:  # the loop checks right after the baseline, before the slow compiles
            report["checks"] = _training_checks(config, device, deadline)
    _add_speedups(report["variants"])
    _add_roofline_fractions(report)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _log(message: str) -> None:
    """Progress on stderr, so that a run cut short still shows how far it came."""
    print(f"doctor: {message}", file=sys.stderr, flush=True)


def _roofline(config: DoctorConfig, device: torch.device) -> dict[str, Any] | None:
    """The device's matmul rate with the threads the benchmarks use."""
    if config.roofline_seconds <= 0:
        return None
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        roof = roofline(device, config.roofline_seconds)
    finally:
        torch.set_num_threads(previous)
    _log("roofline: " + ", ".join(f"{k} {v / 1e9:.1f} GMAC/s" for k, v in roof["mac_per_s"].items()))
    return roof


def _add_roofline_fractions(report: dict[str, Any]) -> None:
    """Each method's MAC rate over the roofline of its variant's precision."""
    roof = report.get("roofline")
    for result in report["variants"].values():
        if "methods" not in result:
            continue
        peak = None if roof is None else peak_for(roof, result["switches"].get("amp", "off"))
        rates = {m: row["mac_per_s"] for m, row in result["methods"].items()}
        fractions = roofline_fraction(rates, peak) if peak else dict.fromkeys(rates)
        for m, row in result["methods"].items():
            row["roofline_fraction"] = fractions[m]


def variant_switches(name: str, device: torch.device) -> dict[str, Any]:
    """The switches a variant turns on; "fast" is every one that applies to the device."""
    if name == FLOAT32:
        return {}
    if name in COMBINATIONS:
        return dict(COMBINATIONS[name])
    if name != FAST:
        return dict(SWITCH_VARIANTS[name])
    fast = {"amp": "bf16", "channels_last": True, "compile": True}
    if device.type == "cuda":
        fast.update(tf32=True, cudnn_benchmark=True)
        if not torch.cuda.is_bf16_supported():
            fast["amp"] = "fp16"
    return fast


def _bench_variant(config: DoctorConfig, device: torch.device, name: str, deadline: float,
                   batch_size: int | None = None) -> dict[str, Any]:
    switches = variant_switches(name, device)
    started = time.monotonic()
    try:
        result = bench(config.bench_config(device, switches, batch_size),
                       deadline=None if name == FLOAT32 else deadline)
    except Exception as e:  # noqa: BLE001 - e.g. no bf16 on this GPU, or a compiler failing: the finding
        return {"switches": switches, "error": _one_line(e)}
    keys = ("seconds_per_step", "images_per_s", "mac_per_s", "ratio_to_mac_floor", "macs_per_step",
            "compile_seconds")
    methods = {m: {k: (result[k] or {}).get(m) for k in keys} for m in result["seconds_per_step"]}
    return {"switches": switches, "methods": methods, "rounds_timed": result["rounds_timed"],
            "seconds": round(time.monotonic() - started, 1),
            **{k: result[k] for k in ("model", "batch_size", "attacker", "attacker_width", "device")}}


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _add_speedups(variants: dict[str, dict[str, Any]]) -> None:
    """Each method's float32 seconds per step over the variant's."""
    base = variants.get(FLOAT32, {}).get("methods", {})
    for result in variants.values():
        for m, row in result.get("methods", {}).items():
            t, t0 = row["seconds_per_step"], base.get(m, {}).get("seconds_per_step")
            row["speedup_vs_float32"] = None if t is None or t0 is None else t0 / t


# ---- the machine -------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device and what it supports."""
    env: dict[str, Any] = {
        "learn2defend": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None for a CPU-only build
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(), tf32=props.major >= 8,  # tensor-core TF32 from Ampere on
            nccl=_nccl_version(),
        )
    else:
        flags = _cpu_flags()
        # autocast runs bf16 on any CPU; it is fast only with native bf16 instructions
        env["bf16"] = "native" if {"avx512_bf16", "amx_bf16"} & flags else ("emulated" if flags else "unknown")
    return env


def _nccl_version() -> str | None:
    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()  # a tuple (2, 27, 3); an int in older torch
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# ---- training checks ---------------------------------------------------------------------------


def _training_checks(config: DoctorConfig, device: torch.device, deadline: float) -> dict[str, Any]:
    """One short epoch in float32, one with the "fast" switches, one under torchrun."""
    checks: dict[str, Any] = {}
    bench_config = config.bench_config(device, {})
    for name in (FLOAT32, FAST, "torchrun"):
        if time.monotonic() > deadline:
            checks[name] = {"skipped": f"the --max-seconds {config.max_seconds:g} were spent"}
            continue
        switches = {} if name == "torchrun" else variant_switches(name, device)
        train_config = _epoch_config(config, bench_config, device, switches)
        with tempfile.TemporaryDirectory(prefix="learn2defend-doctor-") as tmp:
            train_config.out = str(Path(tmp) / "run")
            checks[name] = _torchrun_epoch(train_config) if name == "torchrun" else _epoch(train_config)
        _log(f"check {name}: {'ok' if checks[name]['ok'] else 'FAILED'}")
    return checks


def _epoch_config(config: DoctorConfig, bench_config: BenchConfig, device: torch.device,
                  switches: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        dataset=DATASET, data_dir=config.data_dir, model=bench_config.model, method="grad-l2l", epochs=1,
        batch_size=min(bench_config.batch_size, config.epoch_images // 2), train_size=config.epoch_images,
        val_size=256, val_robust_n=min(256, config.epoch_images), attacker_width=config.attacker_width, progress=False,
        device=str(device), **switches,
    )


def _epoch(train_config: TrainConfig) -> dict[str, Any]:
    """Train one epoch in this process; what it took and reached."""
    from .train import train

    started = time.monotonic()
    try:
        run = train(train_config)
    except Exception as e:  # noqa: BLE001 - a failure on this machine is the finding to report
        return {"ok": False, "error": _one_line(e)}
    record = run.history[-1]
    return {"ok": True, "switches": switches(train_config),
            "train_images": train_config.train_size, "epoch_seconds": record["seconds"],
            "seconds": round(time.monotonic() - started, 1),
            **{k: record[k] for k in ("train_loss", "train_acc", "val_clean_acc", "val_pgd10_acc") if k in record}}


def _torchrun_epoch(train_config: TrainConfig) -> dict[str, Any]:
    """One epoch under `torchrun --nproc_per_node 1` in a subprocess: a process group of one
    (nccl on CUDA, gloo on the CPU) whose collectives the loop really calls."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "learn2defend.doctor", json.dumps(train_config.to_dict())]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "torchrun did not finish within 600 s"}
    seconds = round(time.monotonic() - started, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"ok": False, "returncode": done.returncode, "seconds": seconds, "error": tail[-500:]}
    return {"ok": True, "seconds": seconds, **json.loads(lines[-1])}


def _child_env() -> dict[str, str]:
    """This process's environment, with the folder this package was imported from on
    PYTHONPATH (a source tree run with PYTHONPATH=src works from any directory)."""
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env


def _torchrun_worker(config_json: str) -> None:
    """Inside torchrun: join the process group, train the epoch, print one JSON line."""
    import torch.distributed as dist

    from .train import train

    config = TrainConfig.from_dict(json.loads(config_json))
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    try:
        run = train(config)
        record = run.history[-1]
        print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                          "epoch_seconds": record["seconds"], "train_loss": record["train_loss"],
                          "val_clean_acc": record["val_clean_acc"]}), flush=True)
    finally:
        dist.destroy_process_group()


# ---- text report -------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as text: the environment, one table per variant, the checks, what was skipped."""
    env = report["environment"]
    lines = ["environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    roof = report.get("roofline")
    if roof:
        lines.append(f"roofline (torch.mm, {roof['threads']} threads): " + ", ".join(
            f"{k} {v / 1e9:.1f} GMAC/s at {roof['size'][k]}x{roof['size'][k]}" for k, v in roof["mac_per_s"].items()))
    for name, result in report["variants"].items():
        switches = ", ".join(f"{k}={v}" for k, v in result["switches"].items()) or "none"
        if "error" in result:
            lines += ["", f"{name} ({switches}): {result['error']}"]
            continue
        attacker = result["attacker"] or "per method"
        lines += ["", f"{name} ({switches}): {result['model']}, batch {result['batch_size']}, attacker "
                      f"{attacker} x{result['attacker_width']:g}, {result['rounds_timed']} timed rounds, "
                      f"{result['seconds']:g} s"]
        lines.append(f"{'method':<14}{'s/step':>10}{'images/s':>11}{'GMAC/s':>10}{'x floor':>9}{'x float32':>11}"
                     f"{'of roof':>9}{'compile s':>11}")
        for m, row in result["methods"].items():
            gmacs = None if row["mac_per_s"] is None else row["mac_per_s"] / 1e9
            cells = ((row["seconds_per_step"], 10, 4), (row["images_per_s"], 11, 1), (gmacs, 10, 1),
                     (row["ratio_to_mac_floor"], 9, 2), (row["speedup_vs_float32"], 11, 2),
                     (row.get("roofline_fraction"), 9, 3), (row.get("compile_seconds"), 11, 1))
            lines.append(f"{m:<14}" + "".join(("-" if v is None else f"{v:.{d}f}").rjust(w) for v, w, d in cells))
    for name, check in report.get("checks", {}).items():
        lines.append(f"check {name}: " + ", ".join(f"{k} {v}" for k, v in check.items()))
    for name, reason in report["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    lines.append(f"doctor took {report['seconds']:g} s")
    return "\n".join(lines)


if __name__ == "__main__":  # the torchrun check's worker (python -m learn2defend.doctor CONFIG_JSON)
    _torchrun_worker(sys.argv[1])


__all__ = ["DoctorConfig", "VARIANTS", "doctor", "environment", "format_report"]
