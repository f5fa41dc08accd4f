"""The optimizers of a run, their learning-rate schedules and the weight average.

`make_optimizer` (SGD or Adam), `schedule` (multistep, cosine or onecycle, as PyTorch's
schedulers; `per_batch` says whether one steps per batch or per epoch), `WeightAverage`
(--ema), and `match_layouts`, which gives loaded optimizer buffers their parameter's memory
layout. The training loop (`learn2defend.train`) builds and steps them; `bench` and the
tests build the same optimizers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .settings import OptimizerSettings


def make_optimizer(settings: OptimizerSettings, params, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD or Adam as `settings` say; `fused`: PyTorch's fused kernels (None: its default choice)."""
    o = settings
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)


# OneCycle's peak, as a share of the run (Wong et al. 2020 peak at 2/5 of training).
ONECYCLE_PEAK = 0.4


def schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
             total_steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule `settings.schedule` says, as PyTorch's own scheduler:

    - "multistep": MultiStepLR, the learning rate times `gamma` after each of the `milestones`
      epochs; stepped once per epoch.
    - "cosine": CosineAnnealingLR from `lr` down to 0 over `total_steps` batches (T_max; the
      last batch trains at a small positive rate); stepped once per batch.
    - "onecycle": OneCycleLR over `total_steps` batches with the cyclic schedule of Wong et al.
      2020 ("Fast is better than free", their code's `lr_schedule`: np.interp over
      [0, 2/5, 1] of the run, [0, lr, 0], read after each batch): linear up to `lr` at 2/5 of
      training, then linear down to 0; stepped once per batch. pct_start 0.4 and
      anneal_strategy "linear" give the shape; div_factor = 0.4 x total_steps makes the first
      batch's rate lr / (0.4 x total_steps), so batch t (0-based) trains at exactly Wong et al.'s
      lr (t + 1) / (0.4 x total_steps) on the way up and lr (total_steps - t - 1) /
      (0.6 x total_steps) on the way down, but for torch's final floor (min_lr = first rate /
      1e4, not 0). Their code puts the peak at epoch floor(2 x epochs / 5); here it is at 2/5
      of the batches exactly. Momentum is not cycled (cycle_momentum False: --momentum holds,
      as in Wong et al.). The fast-AT benchmark of Pan & Yao 2026 (fzjcdt/FastAT_Benchmark)
      instead calls OneCycleLR with torch's defaults (cosine annealing, peak at 0.3, cycled
      momentum) and steps it once per epoch.

    `total_steps` (batches of the whole run: epochs x batches per epoch, as the training
    loader counts them) is needed by cosine and onecycle. ValueError for an unknown schedule
    or a missing `total_steps` (config.validate refuses the former first)."""
    lr = torch.optim.lr_scheduler
    if settings.schedule == "multistep":
        return lr.MultiStepLR(optimizer, list(settings.milestones), settings.gamma)
    if total_steps is None or total_steps < 1:
        raise ValueError(f"the {settings.schedule} schedule needs the run's total steps, got {total_steps}")
    if settings.schedule == "cosine":
        return lr.CosineAnnealingLR(optimizer, T_max=total_steps)
    if settings.schedule == "onecycle":
        return lr.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=ONECYCLE_PEAK,
                             anneal_strategy="linear", cycle_momentum=False,
                             div_factor=max(ONECYCLE_PEAK * total_steps, 1.0))
    raise ValueError(f"unknown learning-rate schedule {settings.schedule!r}")


def per_batch(settings: OptimizerSettings) -> bool:
    """Whether the schedule steps after every batch (cosine, onecycle) or every epoch (multistep)."""
    return settings.schedule != "multistep"


class WeightAverage(nn.Module):
    """An exponential moving average of a classifier's weights (--ema DECAY): after step t,
    avg <- d_t avg + (1 - d_t) weights, with d_t = min(DECAY, (1 + t) / (10 + t)).

    The warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) keeps the
    average from clinging to the first, random weights in short runs: 0.99 is reached after
    900 steps, 0.999 after 9,000. Batch-norm running statistics are averaged alike, so the
    averaged net normalizes with statistics of the weights it holds (as timm's ModelEmaV2);
    integer buffers (batch counts) are copied. The step t comes from the loop's position, so
    a resumed run averages exactly as an uninterrupted one, and nothing syncs with the host
    (torch's AveragedModel reads its counter on the host every update). Fast-AT benchmarks
    average weights this way (Pan & Yao 2026; de Jorge et al. 2022).

    `module` is the averaged classifier (eval mode, no gradients); the state dict holds its
    weights under "module.", which `learn2defend.runs.classifier_weights` reads.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*model.parameters(), *model.buffers()], strict=True))
        self._floats = [(a, m) for a, m in pairs if a.is_floating_point()]
        self._others = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the trained model's current weights after step `step` (0-based)."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([a for a, _ in self._floats], [m.detach() for _, m in self._floats], weight)
        for a, m in self._others:
            a.copy_(m)


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer buffer its parameter's memory layout again. Checkpoints store
    tensors contiguous, so after --channels-last a loaded momentum buffer is NCHW while its
    parameter and gradient are NHWC; the fused kernels (--amp fp16) then combine them
    element by element in memory order, which is wrong (seen on the CPU, torch 2.14)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
