"""The speed switches of a training step, in one place for `train` and `bench`.

- `--amp bf16 | fp16`: the step runs under `torch.autocast` in that dtype (weights,
  optimizer state and the loss stay float32). fp16 has a narrow exponent range, so it
  also gets a `torch.amp.GradScaler` that multiplies every loss before its backward and
  divides the gradients again before each optimizer step, for the classifier's optimizer
  and the attacker's alike; the attacker's gradient arrives through the gradient-reversal
  layer, which is linear, so it carries the same factor and is unscaled the same way.
  A step whose gradients overflowed is skipped and the scale lowered. bf16 needs none of
  this (float32's exponent range).
- `--channels-last`: networks and input batches in NHWC memory layout, which cuDNN's and
  oneDNN's fastest convolution kernels use.
- `--compile`: `torch.compile` of the classifier and the attacker (not of the step: it
  calls `autograd.grad`, a custom autograd Function and optimizers).
- `--tf32`, `--cudnn-benchmark` (CUDA only): TF32 tensor-core math for float32 matrix
  products and convolutions, and cuDNN's search for the fastest convolution algorithm.

Defaults per device kind (`DEVICE_DEFAULTS`, `resolve_switches`): a switch left unset
(None in `TrainConfig`) takes the fastest measured choice of the device the run trains
on, among those that keep the numbers (the speed-switch tests' tolerances); the resolved
config, and so config.json, holds the value that ran. A given `--flag`/`--no-flag` wins.
- CPU: channels_last on (1.1-1.2x per step for smallcnn on 8x8 digits, 1.2-1.4x for
  smallcnn-pooled on 32x32, CPU seconds, one thread, docs/performance.md); compile off:
  no faster per step there (torch 2.14), and 5-55 s to compile. The rule that would turn
  it on ("auto", `COMPILE_MIN_STEPS`: only runs long enough to win the compilation back,
  and only with a C++ compiler) is kept for a device where it wins.
- CUDA: tf32 on (1.9-2.4x faster steps on an H200, measured by `doctor`); channels_last
  and compile alone made float32 steps slower there, cudnn_benchmark changed nothing:
  off. bf16/fp16 autocast (2.0-2.7x) changes the numbers a run trains on: opt-in
  everywhere (docs/performance.md).
Resuming: `train --resume` takes the run's config.json, so a run continues with the
switches it ran with, on any device, unless flags say otherwise; from Python,
`train(config, resume=True)` with switches left unset resolves them for the device it
resumes on. Either way the numbers stay those of the run: the switches may change on
resume, and checkpoints hold one layout whatever they were (`optim.match_layouts`).

Evaluation keeps float32: validation during training and the attacks of `eval`,
`transfer`, `sweep` and the sanity checks run in IEEE float32 (`float32_math`), because an
attack computed in low precision can find weaker adversarial examples and overstate
robustness. Of the switches only the layout applies there (`evaluation_layout`): a run
loaded to be attacked takes its device's channels_last default, which changes no precision,
only the order of the sums in a convolution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import UserError
from .settings import ResolvedConfig, SpeedSettings

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile's backend. Tests swap in "aot_eager": the same graph capture and autograd
# tracing, without generating and building C++/Triton kernels (tens of seconds per graph).
COMPILE_BACKEND = "inductor"


# What an unset switch becomes, per device kind; "auto": on only for runs long enough to
# win the compilation back (`COMPILE_MIN_STEPS`). Measured with `learn2defend bench`, one
# thread (docs/performance.md, "Defaults per device").
DEVICE_DEFAULTS: dict[str, dict[str, bool | str]] = {
    "cpu": {"channels_last": True, "compile": False, "tf32": True, "cudnn_benchmark": False},
    "cuda": {"channels_last": False, "compile": False, "tf32": True, "cudnn_benchmark": False},
}
# Why a default is what it is, where the header should say more than "cpu default".
DEFAULT_REASONS = {
    ("cpu", "compile"): "cpu default: no faster per step on this CPU, 5-55 s to compile a method's networks",
}
# compile's "auto": the steps a run needs to win back its compilation, COMPILE_SECONDS
# (measured on the 2-core CPU for the L2L methods' classifier and attacker: ~55 s) at a
# saving of a few milliseconds per step.
COMPILE_SECONDS = {"cpu": 55.0, "cuda": 60.0}
COMPILE_MIN_STEPS = {"cpu": 20_000, "cuda": 20_000}
SWITCH_NAMES = ("channels_last", "compile", "tf32", "cudnn_benchmark")


def resolve_switches(cfg: ResolvedConfig, device: torch.device, steps: int) -> tuple[ResolvedConfig, str]:
    """`cfg` with every unset (None) speed switch set to `device`'s default, and a line
    saying which switches run and why (for train's header). `steps`: the run's training
    steps in all (epochs x batches per epoch), which decides compile's "auto"."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    defaults = DEVICE_DEFAULTS[kind]
    chosen: dict[str, bool] = {}
    why: list[str] = []
    for name in SWITCH_NAMES:
        given = getattr(cfg.speed, name)
        if given is not None:
            chosen[name] = given
            reason = "given"
        elif defaults[name] == "auto":
            chosen[name], reason = _compile_pays(kind, steps)
        else:
            chosen[name] = bool(defaults[name])
            reason = DEFAULT_REASONS.get((kind, name), f"{kind} default")
        if name in ("tf32", "cudnn_benchmark") and kind != "cuda":
            continue  # no effect off CUDA: not worth a word
        why.append(f"{name} {'on' if chosen[name] else 'off'} ({reason})")
    if cfg.speed.amp != "off":
        why.insert(0, f"amp {cfg.speed.amp} (given)")
    resolved = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, **chosen))
    return resolved, "speed: " + ", ".join(why)


def _compile_pays(kind: str, steps: int) -> tuple[bool, str]:
    """Whether compile is on by default for a run of `steps` steps, and why."""
    if kind == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return False, "cpu default: no C++ compiler here"
    need = COMPILE_MIN_STEPS[kind]
    if steps < need:
        return False, (f"run of {steps} steps too short to win back ~{COMPILE_SECONDS[kind]:.0f} s of compilation "
                       f"(needs >= {need})")
    return True, f"{kind} default for runs of >= {need} steps"


def check_switches(cfg: SpeedSettings, device: torch.device, world: int) -> None:
    """UserError for a switch this machine or run cannot honour, before anything is built."""
    if cfg.amp == "fp16" and world > 1:
        # The scaler decides on each process alone whether a step overflowed; the processes
        # would then disagree on skipping it (their gradients are averaged only in the step).
        raise UserError("--amp fp16 does not run under torchrun: the processes could disagree on "
                        "skipping an overflowed step; use --amp bf16")
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                        "support; use --amp fp16")
    if cfg.compile and device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise UserError("--compile on the CPU needs a C++ compiler (g++) to build its kernels; "
                        "install one or leave --compile out")


def prepare_modules(model: nn.Module, attacker: nn.Module | None,
                    cfg: SpeedSettings) -> tuple[nn.Module, nn.Module | None]:
    """Apply --channels-last to the networks in place (their parameters keep their identity,
    so optimizers built before or after both work) and return the modules the training step
    calls: the compiled ones with --compile (they share the parameters), else the same ones.
    Checkpoints always come from the originals, whose state_dict has no compile prefix."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if attacker is not None:
            attacker.to(memory_format=torch.channels_last)
    if not cfg.compile:
        return model, attacker
    compiled_attacker = None if attacker is None else torch.compile(attacker, backend=COMPILE_BACKEND)
    return torch.compile(model, backend=COMPILE_BACKEND), compiled_attacker


# The batches of the validation during training, per device kind: (clean accuracy, PGD-10).
# On the CPU small batches are faster, because their activations stay in the caches: with
# smallcnn-pooled on CIFAR-10 (channels_last, one thread, the same process) clean accuracy
# on 5,000 images took 2.6 s at batch 64 against 6.1 s at 512, and PGD-10 on 500 images
# 6.6 s at 64 against 10.3 s at 256, with the same counts. A batch's random starts are drawn
# in image order from the global RNG, so the numbers drawn, and hence the training that
# follows, do not depend on the batch (l-inf). CUDA keeps the larger batches (unmeasured).
VALIDATION_BATCHES = {"cpu": (64, 64), "cuda": (512, 256)}


def validation_batches(device: torch.device | str) -> tuple[int, int]:
    """(clean, PGD-10) batch sizes of the validation during training on `device`
    (`VALIDATION_BATCHES`)."""
    return VALIDATION_BATCHES["cuda" if torch.device(device).type == "cuda" else "cpu"]


def evaluation_layout(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` (in place, and returned) in the memory layout `device` kind's default gives
    training (`DEVICE_DEFAULTS`), for a run's classifier loaded to be attacked. On the CPU
    that is channels_last: AutoAttack-fast on 500 CIFAR-10 validation images of a
    smallcnn-pooled run took 108 s against 131 s contiguous (1.21x), PGD-10 1.29x, with the
    same accuracies (one thread, docs/performance.md). On CUDA the default keeps the layout."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if DEVICE_DEFAULTS[kind]["channels_last"] is True:
        model.to(memory_format=torch.channels_last)
    return model


def grad_scaler(cfg: SpeedSettings, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for --amp fp16, else None."""
    return torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None


def fused_optimizers(cfg: SpeedSettings) -> bool:
    """Under --amp fp16 the optimizers use their fused kernels: the scaler then hands its
    overflow flag to the kernel on the device, where an unfused optimizer step would read it
    on the host (one device-to-host sync per step)."""
    return cfg.amp == "fp16"


Step = Callable[[Tensor, Tensor], dict[str, Tensor]]


def wrap_step(step: Callable[[Tensor, Tensor], dict[str, Tensor]], cfg: SpeedSettings,
              device: torch.device) -> Step:
    """`step(x, y)` with the switches around it: the batch in channels_last, autocast, and
    the CUDA math flags. With every switch off, `step` itself."""
    contexts: list[Callable[[], contextlib.AbstractContextManager]] = []
    if cfg.amp != "off":
        contexts.append(lambda: torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp]))
    if device.type == "cuda":
        contexts.append(lambda: cuda_math(tf32=bool(cfg.tf32), benchmark=bool(cfg.cudnn_benchmark)))
    if cfg.compile:
        contexts.append(_no_donated_buffers)
    if not contexts and not cfg.channels_last:
        return step

    def wrapped(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            return step(x, y)

    return wrapped


def _no_donated_buffers() -> contextlib.AbstractContextManager:
    """torch.compile's graphs compiled inside the block keep the buffers their backward saved:
    by default a compiled backward may reuse ("donate") them, which forbids a second backward
    through the same graph (retain_graph=True, else a RuntimeError). fgsm-pgi's gradient query
    and fgsm's clean query under fp16 or --label-smoothing take one and later the training
    backward through the same forward. The training steps compile in here (they compile on
    their first call), so a graph cached by one method is safe for another (bench)."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


@contextlib.contextmanager
def cuda_math(*, tf32: bool, benchmark: bool = False) -> Iterator[None]:
    """TF32 for float32 matmuls and cuDNN convolutions on or off, and cuDNN's algorithm
    search, for the duration; the previous settings come back afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=tf32):
            yield
    finally:
        matmul.allow_tf32 = saved


def float32_math(device: torch.device | str) -> contextlib.AbstractContextManager:
    """IEEE float32 on CUDA (no TF32) for evaluation attacks; nothing to change on the CPU."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return cuda_math(tf32=False)
