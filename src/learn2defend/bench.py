"""Seconds per training step of each method, measured alike.

Every method runs the very step function training runs (`learn2defend.methods.STEPS`)
on a `StepContext` built as `learn2defend.train.train` builds it, on one fixed batch.
All methods live in one process and are timed round-robin (the starting method rotates
each round), so a noisy neighbour or a thermal dip slows every method alike instead of
whichever happened to run at that moment. Each step's first call is timed apart
(`first_step_seconds`; under --compile the compilation happens there, and its cost over a
timed step is `compile_seconds`); then warm-up rounds (allocator, oneDNN/cuDNN kernel
choice, lazy init) are run but not recorded; the median of the timed rounds is reported.

The roofline: the device's own dense matmul rate in float32 and bf16 (`roofline`, torch.mm),
and each method's multiply-add rate as a fraction of it (`roofline_fraction`).

Besides the training methods, `attacker-only` times the learned attacker alone
(forward, backward and optimizer step on the grad-l2l input, image and gradient): the
part of an L2L step that FGSM training does not have.

Throughput: images per second, and multiply-accumulates per second by the cost model of
docs/performance.md (`step_forwards`: classifier and attacker forwards per image, with
the forwards' MACs counted on the networks). `ratio_to_mac_floor` is a step's time over
the time its MACs would take at the rate the plain step achieves (1 for plain itself).
The speed switches of training (`learn2defend.speed`) apply as they do in training.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import (
    ATTACKER_WIDTH_HELP,
    DATA_DIR_HELP,
    DEVICE_HELP,
    KL_METHODS,
    METHODS,
    SWITCH_HELP,
    TrainConfig,
    option,
)
from .data import DeviceLoader, load_dataset
from .errors import UserError
from .methods import METHOD_RECORDS, attacker_in_channels, step_optimizers
from .models import ATTACKERS, list_models
from .runs import build_attacker, build_classifier, data_meta, resolve_device
from .settings import ResolvedConfig
from .speed import check_switches, wrap_step
from .train import build_parts

ATTACKER_ONLY = "attacker-only"
BENCH_METHODS = (*METHODS, ATTACKER_ONLY)

# The paper's Table 4: seconds per CIFAR-10 epoch (WRN, one GTX 1080 Ti), slim (S) and
# wide (W) attackers. Only its ratios are comparable with a step time measured here.
_PAPER_BASELINES = {"plain": 36.68, "fgsm": 104.87, "pgd": 421.56}
PAPER_SECONDS_PER_EPOCH: dict[str, dict[str, float]] = {
    "slim": {**_PAPER_BASELINES, "naive-l2l": 117.85, "grad-l2l": 120.48, "2step-l2l": 230.56},
    "wide": {**_PAPER_BASELINES, "naive-l2l": 147.63, "grad-l2l": 152.11, "2step-l2l": 290.61},
}


@dataclass
class BenchConfig:
    """What to time; every method gets the same model, data, batch and attacker. Each field
    is also an option of `learn2defend bench` (config.option)."""

    model: str = option("smallcnn", help="classifier name")
    dataset: str = option("fake:3x32x32:10", help="data set; one batch of it is used")
    batch_size: int = option(128, help="images per step")
    steps: int = option(10, help="timed rounds; the median is reported")
    warmup: int = option(2, help="untimed rounds first")
    methods: list[str] = option(default_factory=lambda: list(METHODS),
                                help="comma-separated (default: all); attacker-only: the attacker alone")
    attacker: str | None = option(None, help="slim | wide | sdi (default: each method's own: slim; sdi for fgsm-sdi)")
    attacker_width: float = option(1.0, help=ATTACKER_WIDTH_HELP)
    eps: float | None = option(None, help="default: per data set, as in training")
    clean_weight: float | None = option(None, help="default: per method, as in training")
    device: str = option("auto", help=DEVICE_HELP)
    data_dir: str = option("data", help=DATA_DIR_HELP)
    seed: int = option(0, help="seed of the weights and the batch")
    threads: int | None = option(None, help="CPU threads (default: torch's, one per core)")
    roofline_seconds: float = option(1.0, help="seconds per dtype (float32, bf16) timing the device's dense "
                                     "matmul rate, the roofline each step's MAC rate is compared with (0: skip)")
    # the speed switches of TrainConfig (learn2defend.speed), applied as training applies them;
    # all off here, tf32 included (training's default is on): bench times IEEE float32 unless told
    amp: str = option("off", help=SWITCH_HELP["amp"])
    channels_last: bool = option(False, switch=True, help=SWITCH_HELP["channels_last"])
    compile: bool = option(False, switch=True, help=SWITCH_HELP["compile"])
    tf32: bool = option(False, switch=True, help="CUDA: TF32 math for the timed steps' matmuls and convolutions "
                        "(training's default; bench times IEEE float32 without it); no effect on the CPU")
    cudnn_benchmark: bool = option(False, switch=True, help=SWITCH_HELP["cudnn_benchmark"])

    def validate(self) -> None:
        if not self.methods:
            raise UserError(f"--methods is empty; choose from: {', '.join(BENCH_METHODS)}")
        for m in self.methods:
            if m not in BENCH_METHODS:
                raise UserError(f"unknown method '{m}'; choose from: {', '.join(BENCH_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError("--methods names a method twice")
        if not self.model.startswith("timm:") and self.model not in list_models():  # timm: names: at build
            known = ", ".join(list_models())
            raise UserError(f"unknown model '{self.model}'; choose one of: {known}")
        if self.attacker is not None and self.attacker not in ATTACKERS:
            known = ", ".join(ATTACKERS)
            raise UserError(f"unknown attacker '{self.attacker}'; choose one of: {known}")
        for name, low in (("steps", 1), ("warmup", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be an integer >= {low}, got {value}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"--threads must be a positive integer, got {self.threads}")
        if not (isinstance(self.roofline_seconds, (int, float)) and 0 <= self.roofline_seconds <= 60):
            raise UserError(f"--roofline-seconds must be in [0, 60], got {self.roofline_seconds}")

    def train_config(self, method: str) -> ResolvedConfig:
        """The resolved training configuration this method is timed with."""
        config = TrainConfig(
            dataset=self.dataset, data_dir=self.data_dir, model=self.model,
            method="grad-l2l" if method == ATTACKER_ONLY else method,
            batch_size=self.batch_size, eps=self.eps,
            # trades and mart have a clean term of their own: --clean-weight leaves them as they are
            clean_weight=None if method in KL_METHODS else self.clean_weight,
            attacker=self.attacker, attacker_width=self.attacker_width, device=self.device,
            seed=self.seed, amp=self.amp, channels_last=self.channels_last, compile=self.compile,
            tf32=self.tf32, cudnn_benchmark=self.cudnn_benchmark,
        )
        return config.resolve()  # eps, width, clean weight: the same checks and messages as training


# ---- the roofline: this device's own dense matrix-multiply rate -----------------------------

ROOFLINE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                seconds: float = 1.0, repeats: int = 5) -> tuple[float, int]:
    """(multiply-adds per second, matrix size) of `torch.mm` on two square matrices of
    `dtype`: on the CPU oneDNN's/MKL's GEMM with torch's current threads, on CUDA cuBLAS.

    The size is `size`, or the largest of 256, 512, ... up to 8192 on CUDA and 2048 on the
    CPU whose one call takes under `seconds` / 8 (a CPU without native bf16 instructions
    emulates bf16 hundreds of times slower than float32: there the size stays small). Each
    size's first call is untimed (kernel choice, page faults); then up to `repeats` timed
    calls while fewer than `seconds` have passed (at least one); the median. The practical
    roofline a training step's multiply-add rate is measured against (`roofline_fraction`)."""
    cuda = device.type == "cuda"
    largest = size or (8192 if cuda else 2048)
    n = size or 256

    def timed(a: Tensor, b: Tensor, out: Tensor) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def operands(n: int) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        return (torch.randn(n, n, device=device, dtype=dtype, generator=g),
                torch.randn(n, n, device=device, dtype=dtype, generator=g),
                torch.empty(n, n, device=device, dtype=dtype))

    mats = operands(n)
    timed(*mats)
    while n < largest and timed(*mats) * 8 < seconds / 8:  # the doubled size's call: 8x as long
        n *= 2
        mats = operands(n)
        timed(*mats)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - began < seconds):
        times.append(timed(*mats))
    return n**3 / statistics.median(times), n


def roofline(device: torch.device, seconds: float = 1.0, size: int | None = None) -> dict[str, Any]:
    """This device's dense matmul rate in float32 and bf16 (`matmul_rate`): multiply-adds
    per second and the matrix size by dtype name, and the threads."""
    rates = {name: matmul_rate(device, dtype, size, seconds) for name, dtype in ROOFLINE_DTYPES.items()}
    return {"mac_per_s": {k: r for k, (r, _) in rates.items()}, "size": {k: n for k, (_, n) in rates.items()},
            "threads": torch.get_num_threads(), "op": "torch.mm", "seconds_per_dtype": seconds}


def roofline_fraction(mac_per_s: dict[str, float | None], peak: float) -> dict[str, float | None]:
    """Each method's achieved multiply-add rate over the device's matmul rate `peak`."""
    return {m: None if r is None else r / peak for m, r in mac_per_s.items()}


def peak_for(roof: dict[str, Any], amp: str) -> float:
    """The roofline that applies to a step: bf16's under --amp bf16 (fp16 alike: the same
    tensor-core rate), else float32's."""
    return roof["mac_per_s"]["bf16" if amp in ("bf16", "fp16") else "float32"]


Step = Callable[[], Any]
CPU_MEMORY_KIND = "none: the CPU has no per-step allocator peak (RSS high-water is process-wide)"


def _training_step(
    config: ResolvedConfig, meta: dict[str, Any], device: torch.device, x: Tensor, y: Tensor
) -> Step:
    """One training step of `config.method`, set up as train.train sets it up (every method
    starts from the same weights: build_parts seeds with config.seed)."""
    parts = build_parts(config, meta, device)
    parts.model.train()
    if parts.attacker is not None:
        parts.attacker.train()
    step = parts.step(config, device)

    def one_step() -> Any:  # the batch counter advances as in training (--attacker-every)
        result = step(x, y)
        parts.ctx.step_index += 1
        return result
    return one_step


def _attacker_only_step(
    config: ResolvedConfig, meta: dict[str, Any], device: torch.device, x: Tensor
) -> Step:
    """The grad-l2l attacker's forward, backward and optimizer step, and nothing else.

    Its input is the image and a (sample-normalized) gradient-shaped tensor; the backward
    starts from a fixed random upstream gradient, standing in for the one the classifier
    sends back through the gradient reversal. The speed switches apply as in training.
    """
    ctx = build_parts(config, meta, device).ctx
    ctx.attacker.train()
    grad = torch.randn_like(x)
    a = torch.cat([x, grad / grad.abs().amax(dim=(1, 2, 3), keepdim=True)], dim=1)
    upstream = torch.randn_like(x)

    def attacker_step(a: Tensor, _: Tensor) -> dict[str, Tensor]:
        loss = (ctx.attacker(a, config.eps).float() * upstream).sum()  # its gradient w.r.t. delta: upstream
        step_optimizers(ctx, loss, [ctx.attacker_optimizer])
        return {}

    step = wrap_step(attacker_step, config.speed, device)
    return lambda: step(a, x)


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-adds of everything `fn` runs, forward and backward passes alike, with the
    formulas of torch.utils.flop_counter (convolutions and matrix products).

    A plain dispatch mode instead of FlopCounterMode: the latter hooks every module's
    backward to attribute flops to modules, which autograd.grad with leaf inputs (every
    attack here) refuses."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func.overloadpacket)
            if formula is not None:
                Counter.flops += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Counter():
        fn()
    return Counter.flops // 2  # the formulas count a multiply-add as two flops


def step_macs(config: ResolvedConfig, meta: dict[str, Any], batch_size: int | None = None) -> int:
    """Multiply-adds of one training step of `config.method` (resolved config) on a batch of
    `batch_size` images (default: the config's), everything included: attack, forwards,
    backwards, the attacker. Counted on a CPU on the first step with two and with four random
    images: what grows with the batch is scaled to it, and what does not (LIET's class-wise
    query, run once every --start-every batches) is spread over its period. The global random
    state is left as it was."""
    c, h, w = meta["image_shape"]

    def counted(n: int) -> int:
        with torch.random.fork_rng(devices=[]):
            x = torch.rand(n, c, h, w)
            y = torch.arange(n) % len(meta["classes"])
            return count_macs(_training_step(config, meta, torch.device("cpu"), x, y))

    two, four = counted(2), counted(4)
    per_image = (four - two) / 2
    per_batch = max(two - 2 * per_image, 0.0)  # does not grow with the batch
    return round(per_image * (batch_size or config.batch_size) + per_batch / (config.attack.start_every or 1))


def bench(config: BenchConfig, deadline: float | None = None) -> dict[str, Any]:
    """Time each method's training step; return medians, ratios, throughput and peak memory.

    `deadline` (a `time.monotonic()` value): no step starts after it, and only complete
    rounds count; if none was timed, the times are None ("rounds_timed": 0)."""
    config.validate()
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _bench(config, deadline)
    finally:
        torch.set_num_threads(previous)


def _bench(config: BenchConfig, deadline: float | None) -> dict[str, Any]:
    configs = {m: config.train_config(m) for m in config.methods}
    device = resolve_device(config.device)
    check_switches(configs[config.methods[0]].speed, device, world=1)
    data = load_dataset(config.dataset, config.data_dir)
    meta = data_meta(data)
    if len(data.train) < config.batch_size:
        raise UserError(f"--batch-size {config.batch_size} exceeds the {len(data.train)} "
                        f"training images of {config.dataset}")
    x, y = next(iter(DeviceLoader(data.train, config.batch_size, device, shuffle=False)))

    steps: dict[str, Step] = {}
    for m, c in configs.items():
        steps[m] = (_attacker_only_step(c, meta, device, x) if m == ATTACKER_ONLY
                    else _training_step(c, meta, device, x, y))
    times, cpu_times, peaks, first = _time_round_robin(steps, config, device, deadline)
    timed = bool(times[config.methods[0]])
    median = {m: statistics.median(t) if timed else None for m, t in times.items()}
    roof = roofline(device, config.roofline_seconds) if config.roofline_seconds > 0 else None

    def ratios(ref: str) -> dict[str, float] | None:
        return {m: t / median[ref] for m, t in median.items()} if ref in median and timed else None

    cuda = device.type == "cuda"
    macs = {m: config.batch_size * step_macs_per_image(c, meta, m == ATTACKER_ONLY) for m, c in configs.items()}
    return {
        "seconds_per_step": median,
        "seconds_min": {m: min(t) if timed else None for m, t in times.items()},
        # CPU time of the whole process (all threads): on a shared machine, waiting for a
        # core does not count, so it tracks the work done better than the wall clock does
        "cpu_seconds_per_step": {m: statistics.median(t) if timed else None for m, t in cpu_times.items()},
        "ratio_to_pgd": ratios("pgd"),
        "ratio_to_fgsm": ratios("fgsm"),
        **_throughput(median, macs, config.batch_size),
        # the first call of each step, timed apart: with --compile its compilation, whose cost
        # over a timed step is compile_seconds (None without --compile)
        "first_step_seconds": first,
        "compile_seconds": {m: None if not config.compile or median[m] is None or first.get(m) is None
                            else max(0.0, first[m] - median[m]) for m in median},
        "roofline": roof,
        "roofline_fraction": None if roof is None else
        roofline_fraction(_throughput(median, macs, config.batch_size)["mac_per_s"], peak_for(roof, config.amp)),
        "peak_memory_bytes": peaks if cuda else dict.fromkeys(steps),
        "memory_kind": "cuda_max_allocated_above_step_start" if cuda else CPU_MEMORY_KIND,
        "device": str(device) if not cuda else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "model": config.model,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "attacker": config.attacker,
        "attacker_width": config.attacker_width,
        "eps": configs[config.methods[0]].eps,
        "steps": config.steps,
        "warmup": config.warmup,
        "rounds_timed": len(times[config.methods[0]]),
        "switches": switches(config),
        "torch": torch.__version__,
    }


def _time_round_robin(steps: dict[str, Step], config: BenchConfig, device: torch.device, deadline: float | None
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int], dict[str, float]]:
    """Wall and CPU seconds of each timed round of each step, the CUDA peak memory, and
    the seconds of each step's first call (compilation happens there). A first round,
    before the warm-up, calls every step once and is never counted as a timed one. Past
    `deadline` no step starts (a first call that compiles may take long); only the rounds
    every method finished count."""
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {m: [] for m in steps}
    cpu_times: dict[str, list[float]] = {m: [] for m in steps}
    peaks: dict[str, int] = dict.fromkeys(steps, 0)
    first: dict[str, float] = {}
    for m, step in steps.items():
        if deadline is not None and time.monotonic() > deadline:
            break
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        first[m] = time.perf_counter() - start
    order = list(steps)
    for r in range(config.warmup + config.steps):
        shift = r % len(order)  # rotate who goes first: no method always follows the same one
        for m in order[shift:] + order[:shift]:
            if deadline is not None and time.monotonic() > deadline:
                n = min(len(t) for t in times.values())
                return {m: t[:n] for m, t in times.items()}, {m: t[:n] for m, t in cpu_times.items()}, peaks, first
            if cuda:
                torch.cuda.synchronize(device)  # the benchmark may sync; the training loop must not
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[m]()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if r >= config.warmup:
                times[m].append(seconds)
                cpu_times[m].append(time.process_time() - cpu_start)
                if cuda:
                    # above what was resident at the start: every benchmarked method's weights
                    # and optimizer state live on the device at once and would mask the step's own
                    peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated(device) - resident)
    return times, cpu_times, peaks, first


def _throughput(median: dict[str, float | None], macs: dict[str, float], batch_size: int) -> dict[str, Any]:
    """Images and multiply-accumulates per second, and each step's time over its MAC floor:
    the time its MACs (cost model) would take at the rate the plain step achieves."""
    def per_second(amount: dict[str, float] | float) -> dict[str, float | None]:
        return {m: None if t is None else (amount[m] if isinstance(amount, dict) else amount) / t
                for m, t in median.items()}

    mac_rate = per_second(macs)
    plain_rate = mac_rate.get("plain")
    return {
        "images_per_s": per_second(float(batch_size)),
        "macs_per_step": macs,
        "mac_per_s": mac_rate,
        "ratio_to_mac_floor": None if plain_rate is None else {m: plain_rate / r for m, r in mac_rate.items()},
    }


# ---- the MAC cost model (docs/performance.md, "Cost model") ---------------------------------


def forward_macs(module: nn.Module, *inputs: Any) -> int:
    """Multiply-adds of one forward pass of `module` on `inputs` (eval mode, no gradients)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return count_macs(lambda: module(*inputs))
    finally:
        module.train(was_training)


def step_forwards(config: ResolvedConfig, attacker_only: bool = False) -> tuple[float, float]:
    """(classifier forwards F, attacker forwards A) per image of one (average) training step
    of `config.method`, from its record (`learn2defend.methods.Method.forwards`). A backward
    costs 2 forwards (input and weight gradients), 1 when only input gradients are taken;
    `attacker_only`: the bench's attacker-alone step (3A)."""
    if attacker_only:
        return 0.0, 3.0
    return METHOD_RECORDS[config.method].forwards(config)


def step_macs_per_image(config: ResolvedConfig, meta: dict[str, Any], attacker_only: bool = False) -> float:
    """The cost model's multiply-accumulates per image of one step: F and A counted on the
    networks the run builds, weighted by `step_forwards`."""
    c, h, w = meta["image_shape"]
    n_cls, n_att = step_forwards(config, attacker_only)
    macs = n_cls * forward_macs(build_classifier(config, meta).eval(), torch.zeros(1, c, h, w)) if n_cls else 0.0
    attacker = build_attacker(config, meta)
    if n_att and attacker is not None:
        channels = attacker_in_channels(config.method, c)
        macs += n_att * forward_macs(attacker.eval(), torch.zeros(1, channels, h, w), config.eps)
    return macs


SWITCHES = ("amp", "channels_last", "compile", "tf32", "cudnn_benchmark")


def switches(config: BenchConfig | TrainConfig) -> dict[str, Any]:
    """The speed switches of a configuration, by name."""
    return {name: getattr(config, name) for name in SWITCHES}


def format_table(result: dict[str, Any]) -> str:
    """A readable table, with the paper's Table 4 ratios beside the measured ones."""
    paper = PAPER_SECONDS_PER_EPOCH.get(result["attacker"] or "slim", {})
    res = result
    head = (f"{res['model']} on {res['dataset']}, batch {res['batch_size']}, {res['device']}, "
            f"{res['threads']} threads, attacker {res['attacker'] or 'per method'} x{res['attacker_width']:g}, "
            f"median of {res['steps']} steps after {res['warmup']} warm-up")
    cols = ["method", "s/step", "min s", "cpu s", "x fgsm", "x pgd", "paper x fgsm",
            "paper x pgd", "peak MiB"]

    def measured(m: str, ref: str) -> str:
        ratios = res[f"ratio_to_{ref}"]
        return f"{ratios[m]:.2f}" if ratios else "-"

    def published(m: str, ref: str) -> str:
        return f"{paper[m] / paper[ref]:.2f}" if m in paper else "-"

    rows = []
    for m, t in res["seconds_per_step"].items():
        peak = res["peak_memory_bytes"][m]
        mib = "-" if peak is None else f"{peak / 2**20:.0f}"
        rows.append([m, f"{t:.4f}", f"{res['seconds_min'][m]:.4f}",
                     f"{res['cpu_seconds_per_step'][m]:.4f}", measured(m, "fgsm"),
                     measured(m, "pgd"), published(m, "fgsm"), published(m, "pgd"), mib])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
