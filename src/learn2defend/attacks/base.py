"""Attack objects: `attack(model, images, labels) -> adversarial images`, torchattacks style."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from learn2defend.errors import UserError

from .functional import LOSSES, fgsm_delta, pgd_delta
from .threat import ThreatModel, threat_model


def correct_predictions(logits: Tensor, labels: Tensor) -> Tensor:
    """Per image (bool [B]): the model predicts `labels` [B] from `logits` [B, K]. The one
    rule every accuracy uses: an image whose logits are not all finite is wrong, whatever
    its label (argmax of a NaN row is 0, which would score label-0 images as correct)."""
    return (logits.argmax(1) == labels) & torch.isfinite(logits).all(1)


def in_model_dtype(model: nn.Module, images: Tensor) -> Tensor:
    """`images` in the floating dtype of `model`'s first floating parameter or buffer (float64,
    float16 or bfloat16 images given to a float32 model are converted at the boundary, where
    torch would otherwise stop with "expected scalar type"); unchanged when they already
    match or the model holds no floating tensors."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return images if images.dtype == t.dtype else images.to(t.dtype)
    return images


def check_eps(eps: float, norm: str | ThreatModel | None = None) -> float:
    """eps is a radius in pixel units: under l-inf (the default) it must lie in [0, 1];
    under l2 in [0, the threat model's eps_max] (learn2defend.attacks.threat)."""
    return threat_model(norm).check_eps(eps)


def check_images(images: object) -> Tensor:
    """Images for an attack or an evaluation: a floating-point tensor [N, C, H, W] in [0, 1].

    Returns the tensor unchanged. Raises UserError otherwise (NaN pixels included).
    """
    if not isinstance(images, Tensor):
        raise UserError(f"images must be a torch.Tensor [N, C, H, W] in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        hint = " (divide uint8 images by 255)" if images.dtype == torch.uint8 else ""
        raise UserError(f"images must be floating point in [0, 1], got dtype {images.dtype}{hint}")
    if images.dim() != 4:
        raise UserError(f"images must be 4-D [N, C, H, W], got shape {list(images.shape)}")
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        raise UserError(
            "images must lie in [0, 1] (no NaN); got values in "
            f"[{float(images.nan_to_num(0).min()):g}, {float(images.nan_to_num(0).max()):g}]"
            + ("" if not bool(images.isnan().any()) else " and NaN")
            + "; a model that expects normalized input should normalize inside its forward"
        )
    return images


def check_labels(labels: object, n: int, n_classes: int | None = None) -> Tensor:
    """Labels for `n` images: a 1-D integer tensor (any width) with values in [0, n_classes).

    Returns them as int64 (what cross-entropy and indexing need). Raises UserError
    otherwise; the range is checked only when `n_classes` is given.
    """
    if not isinstance(labels, Tensor):
        raise UserError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise UserError(f"labels must be 1-D [N], got shape {list(labels.shape)}")
    if len(labels) != n:
        raise UserError(f"{n} images but {len(labels)} labels")
    labels = labels.long()
    if n_classes is not None and len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise UserError(f"label {bad} is out of range: the model has {n_classes} classes, so labels "
                            f"must lie in [0, {n_classes - 1}]")
    return labels


def num_classes(model: nn.Module, images: Tensor) -> int:
    """The number of logits `model` returns for one image (one forward, no gradients)."""
    with torch.no_grad():
        logits = model(images[:1])
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UserError(f"the model must return logits [N, classes]; it returned {shape}")
    return int(logits.shape[1])


@contextlib.contextmanager
def model_state_kept(*models: nn.Module | None) -> Iterator[None]:
    """Restore, on exit, every module's train/eval mode and every parameter's
    `requires_grad` and `.grad` of the given models, exactly as they were."""
    modules = [m for model in models if model is not None for m in model.modules()]
    params = list(dict.fromkeys(p for m in modules for p in m.parameters(recurse=False)))
    modes = [m.training for m in modules]
    flags = [(p.requires_grad, p.grad) for p in params]
    try:
        yield
    finally:
        for m, training in zip(modules, modes, strict=True):
            m.training = training
        for p, (flag, grad) in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, attack name, restart, image key), stable across
    processes and Python versions (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_keys(images: Tensor) -> list[int]:
    """One integer per image that depends only on its pixels (their float32 bits): the
    same image gets the same key in any batch, at any position, on any device."""
    bits = images.detach().to(torch.float32).contiguous().view(torch.int32).flatten(1).to(torch.int64)
    gen = torch.Generator().manual_seed(bits.shape[1])
    weights = torch.randint(1, 2**12, (bits.shape[1],), generator=gen).to(bits.device)
    return (bits * weights).sum(1).tolist()  # exact: integer sums do not depend on the order


def keyed_uniform(images: Tensor, *stream: object) -> Tensor:
    """Noise uniform in [-1, 1], shaped like `images`, drawn per image from a generator
    seeded with (stream, the image's key): each image's noise depends only on the image
    and the stream, never on the rest of its batch, the batch size or the global RNG."""
    out = torch.empty(images.shape, dtype=torch.float32)
    for row, key in zip(out, image_keys(images), strict=True):
        row.uniform_(-1, 1, generator=torch.Generator().manual_seed(stream_seed(*stream, key)))
    return out.to(images)


class _FiniteGradient(torch.autograd.Function):
    """Identity forward; backward replaces NaN input gradients by 0 and +-inf by +-big,
    and records on `seen` whether it had to."""

    @staticmethod
    def forward(ctx, x: Tensor, seen: list[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.seen = seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        bad = ~torch.isfinite(grad)
        ctx.seen[0] = ctx.seen[0] | bad.any()  # a device tensor: no host sync here
        # The largest finite value whose square, summed over millions of pixels, stays finite
        # (Adam-style attacks square gradients); the sign is what sign-gradient steps use.
        big = torch.finfo(grad.dtype).max ** 0.25 if grad.is_floating_point() else 1.0
        return torch.nan_to_num(grad, nan=0.0, posinf=big, neginf=-big), None


class _FiniteGradientModel(nn.Module):
    """`model` whose input gradients are finite (see `_FiniteGradient`)."""

    def __init__(self, model: nn.Module, seen: list[Tensor]) -> None:
        super().__init__()
        self.model = model
        self.seen = seen

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_FiniteGradient.apply(x, self.seen) if x.requires_grad else x)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_step_size(step_size: float) -> float:
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not (math.isfinite(step_size) and step_size > 0)
    ):
        raise UserError(f"step_size must be a positive number, got {step_size!r}")
    return float(step_size)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    return seed


NONFINITE_GRADIENT_WARNING = (
    "the model's input gradient was NaN or infinite at some pixels; the attack treated NaN "
    "as 0 and infinity as a large finite value there, so its accuracy may overestimate "
    "robustness (see the 'gradients' sanity check, eval --checks)"
)


class Attack:
    """Base class: subclasses implement `perturb(model, images, labels)`.

    `attack(model, images, labels, seed=None)` takes images [N, C, H, W], floating point
    in [0, 1], and integer labels [N] (any integer dtype) in [0, number of classes), and
    returns adversarial images of the same shape and dtype, detached, finite, within eps
    of the images under the attack's norm (`self.threat`, l-inf unless `norm` says
    otherwise; pixel units) and in [0, 1]. Bad images or labels raise UserError.

    It runs the attack with the model in eval mode (BatchNorm/dropout must not react to
    adversarial batches), then restores every module's mode and every parameter's
    `requires_grad` and `.grad` exactly as they were, so it is safe to call mid-training.

    Randomness: the attack's random numbers (random starts) come from generators seeded
    with (seed, the attack's name, each image's pixels); `seed` defaults to `self.seed`
    (0). The result for an image therefore depends only on the model, the image, the
    attack and the seed: not on the other images of the batch, the batch size, the other
    attacks run, or the global torch RNG, which attacks never touch.

    Non-finite gradients: the model sees its input through an identity whose backward
    replaces NaN input gradients by 0 and infinite ones by large finite values; the
    attack then records `NONFINITE_GRADIENT_WARNING` in `self.warnings`. Any non-finite
    pixel left in the result is replaced by the clean pixel.
    """

    name = "attack"
    # The norms the attack is defined for (names of learn2defend.attacks.threat.THREAT_MODELS).
    norms: tuple[str, ...] = ("linf", "l2")

    def __init__(self, eps: float, norm: str | ThreatModel | None = None) -> None:
        self.threat = threat_model(norm)
        if self.threat.name not in self.norms:
            raise UserError(f"{type(self).__name__} is defined for {', '.join(self.norms)} only, not "
                            f"{self.threat.label}")
        self.eps = self.threat.check_eps(eps)
        self.seed = 0
        self.warnings: list[str] = []  # accumulated over calls, unique
        self._call_seed = 0

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def random_uniform(self, images: Tensor, *stream: object) -> Tensor:
        """Noise uniform in [-1, 1] shaped like `images`, from (this call's seed, this
        attack's name, `stream`, each image's pixels): see the class docstring."""
        return keyed_uniform(images, self._call_seed, self.name, *stream)

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def __call__(
        self, model: nn.Module, images: Tensor, labels: Tensor, *, seed: int | None = None
    ) -> Tensor:
        images = in_model_dtype(model, check_images(images))  # returned in the model's dtype too
        labels = check_labels(labels, len(images))
        self._call_seed = self.seed if seed is None else _check_seed(seed)
        seen = [torch.zeros((), dtype=torch.bool, device=images.device)]
        with model_state_kept(model):
            for p in model.parameters():  # some attacks (AutoAttack's FAB) call .backward(): keep it off ours
                p.grad = None
            model.eval()
            if len(images):
                labels = check_labels(labels, len(images), num_classes(model, images))
            if self.eps == 0:  # the ball is one point: every attack returns the images themselves
                return images.detach().clone()
            guarded = _FiniteGradientModel(model, seen).eval()
            adv = self.perturb(guarded, images.detach(), labels.to(images.device))
        if bool(seen[0]):
            self._warn(NONFINITE_GRADIENT_WARNING)
        return self._in_ball(adv.detach(), images.detach())

    def _in_ball(self, adv: Tensor, images: Tensor) -> Tensor:
        """Non-finite pixels -> the clean pixel; then into the eps-ball and [0, 1] (under
        l-inf a no-op, bit for bit, on pixels already there)."""
        adv = torch.where(torch.isfinite(adv), adv, images).to(images.dtype)
        return self.threat.within(adv, images, self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, eps={self.eps:g}{self._norm_repr()})"

    def _norm_repr(self) -> str:
        """", norm='l2'" for attacks under another norm than l-inf (older reprs unchanged)."""
        return "" if self.threat.name == "linf" else f", norm={self.threat.name!r}"


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al.): one signed step of size eps
    (`step_size` overrides it); `random_start` adds a uniform start in the ball (FGSM-RS).
    Under l2 it is FGM (Miyato et al.): one step of eps along g / ||g||_2."""

    def __init__(
        self, eps: float, *, step_size: float | None = None, random_start: bool = False,
        norm: str | ThreatModel | None = None,
    ) -> None:
        super().__init__(eps, norm)
        self.step_size = None if step_size is None else _check_step_size(step_size)
        self.random_start = bool(random_start)
        self.name = "fgsm"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        init = self._start(images, 0) if self.random_start else None
        delta = fgsm_delta(model, images, labels, self.eps, step_size=self.step_size, init=init, norm=self.threat)
        return (images + delta).clamp(0, 1)

    def _start(self, images: Tensor, restart: int) -> Tensor:
        """A start uniform in the ball (the threat model's `start`), from this call's keyed noise."""
        noise = lambda *tag: self.random_uniform(images, "start", restart, *tag)  # noqa: E731
        return self.threat.project(self.threat.start(images, self.eps, noise), images, self.eps)


class PGD(Attack):
    """PGD (Madry et al.) with the CE or the CW margin loss, optionally restarted; l-inf
    (signed steps) or l2 (normalized-gradient steps, projection as MadryLab's robustness and
    torchattacks' PGDL2), by `norm`; the default step 2.5 * eps / steps under both, as
    robustness uses.

    With restarts > 1 each sample keeps the first restart that fools the model (or the
    last one if none does), so a success is never overwritten by a later failure.
    """

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        name: str | None = None,
        norm: str | ThreatModel | None = None,
    ) -> None:
        super().__init__(eps, norm)
        self.steps = _check_positive_int("steps", steps)
        self.restarts = _check_positive_int("restarts", restarts)
        if loss not in LOSSES:
            raise UserError(f"unknown attack loss {loss!r}; use one of {', '.join(LOSSES)}")
        # Madry's rule: 2.5 * eps / steps lets a step-size-limited walk reach and move along
        # the boundary of the ball within the budget.
        self.step_size = (
            2.5 * self.eps / self.steps if step_size is None else _check_step_size(step_size)
        )
        self.random_start = bool(random_start)
        self.loss = loss
        self.name = name or f"{'cwpgd' if loss == 'margin' else 'pgd'}{self.steps}"

    _start = FGSM._start

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        best = None
        fooled = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        for restart in range(self.restarts):
            delta = pgd_delta(
                model,
                images,
                labels,
                self.eps,
                steps=self.steps,
                step_size=self.step_size,
                init=self._start(images, restart) if self.random_start else None,
                loss=self.loss,
                norm=self.threat,
            )
            if self.restarts == 1:
                return (images + delta).clamp(0, 1)
            with torch.no_grad():
                wrong = ~correct_predictions(model(images + delta), labels)
            keep = ~fooled.view(-1, *[1] * (images.dim() - 1))
            best = delta if best is None else torch.where(keep, delta, best)
            fooled |= wrong
            if bool(fooled.all()):
                break
        return (images + best).clamp(0, 1)

    def __repr__(self) -> str:
        return (
            f"PGD(name={self.name!r}, eps={self.eps:g}, steps={self.steps}, "
            f"step_size={self.step_size:g}, random_start={self.random_start}, "
            f"restarts={self.restarts}, loss={self.loss!r}{self._norm_repr()})"
        )
