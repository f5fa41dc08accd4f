"""The training methods: one step per method, all sharing the loop in `learn2defend.train`,
and one record per method (`METHOD_RECORDS`) that everything else reads.

The steps live in `methods.steps` (the hand-designed, KL-based and learned-attacker methods,
and the pieces every step shares) and `methods.starts` (LIET and FGSM-PGI, whose starts are
shared or remembered); this module holds the records and re-exports the steps' names.

Each step takes a batch of [0, 1] images, builds the images the classifier trains
on, updates the parameters and returns batch metrics as device tensors (summed over
the batch, never `.item()`-ed here: the loop reads them once per epoch). How the L2L methods'
single backward pass and the loss scaler work: `methods.steps`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..settings import ResolvedConfig
from .starts import (  # noqa: F401 (re-exported)
    LIET_MASK_RATIO,
    LIET_STATE,
    _liet_forwards,
    fgsm_pgi_step,
    js_divergence,
    liet_class_starts,
    liet_js_weight,
    liet_refresh_due,
    liet_start,
    liet_step,
    pgi_epoch_start,
)
from .steps import (  # noqa: F401 (re-exported)
    Grads,
    Metrics,
    StepContext,
    _extra_attacker_updates,
    attacker_input,
    batch_metrics,
    clean_forward_with_grad,
    condition_gradient,
    eval_mode,
    fgsm_sdi_step,
    fgsm_step,
    l2l_step,
    learned_perturbation,
    mart_loss,
    mart_step,
    mixed_loss,
    n_fgsm_step,
    pgd_at_step,
    pgd_step,
    plain_step,
    reverse_gradient,
    run_attacker,
    sdi_perturbation,
    step_optimizers,
    trades_loss,
    trades_step,
    update,
)

# ---- the method records ------------------------------------------------------------------


@dataclass(frozen=True)
class Default:
    """A method's default for a config field left at None: `value(config)`, where config is
    the learn2defend.config.TrainConfig being resolved (eps already filled in)."""

    value: Callable[[Any], Any]
    text: str  # for --help, e.g. "eps/4"


@dataclass(frozen=True)
class Method:
    """Everything that makes a training method what it is; config, the CLI, bench, the
    run folder and the l2l: attack all read it from here (`METHOD_RECORDS`).

    attacker_sees: "" (no attacker), "image" or "image+gradient" (channels: 1x or 2x the image's).
    perturbation: for methods with an attacker, the perturbation it makes (used by `l2l:DIR`).
    defaults: config fields left at None and what they become for this method.
    options: the method-specific options (config field names) it takes; giving one of them to
    another method is an error.
    forwards: (classifier forwards, attacker forwards) per image of an average step: the MAC
    cost model (learn2defend.bench.step_forwards). A backward costs 2 forwards (input and
    weight gradients), 1 when only input gradients are taken.
    colour, marker: how every figure draws the method (a matplotlib colour and filled marker;
    `method_styles`); "" takes the first of STYLE_COLOURS / STYLE_MARKERS no record holds.
    """

    name: str
    step: Callable[[StepContext, Tensor, Tensor], Metrics]
    help: str
    forwards: Callable[[ResolvedConfig], tuple[float, float]]
    attacker_sees: str = ""
    # The learned attack alone, perturbation(ctx, x, y, grad at x or None) -> delta: what the
    # `l2l:DIR` evaluation attack applies to another model.
    perturbation: Callable[[StepContext, Tensor, Tensor, Tensor | None], Tensor] | None = None
    defaults: dict[str, Default] = field(default_factory=dict)
    options: frozenset[str] = frozenset()
    # Threat models (learn2defend.attacks.threat names) the method has no form for, each with
    # the reason; training under one of them is refused before anything is written.
    unsupported_norms: dict[str, str] = field(default_factory=dict)
    colour: str = ""
    marker: str = ""
    # A per-image memory (learn2defend.memory): "" (none), "perturbation" (one buffer) or
    # "perturbation+momentum" (two). The loop makes one for the training split, passes each
    # batch's indices (StepContext.indices), checkpoints it and merges it across ranks;
    # `epoch_start(ctx, epoch)` runs before each epoch's first batch.
    per_image_memory: str = ""
    epoch_start: Callable[[StepContext, int], None] | None = None

    @property
    def has_attacker(self) -> bool:
        return bool(self.attacker_sees)


_L2L = frozenset({"attacker_every", "attacker_steps"})
_PAPER_L2L = _L2L | {"l2l_update"}


def _eps_times(k: float, text: str) -> Default:
    return Default(lambda c: k * c.eps, text)


def _w(c: ResolvedConfig) -> float:
    return 1.0 if c.loss.clean_weight else 0.0


def _split_clean(c: ResolvedConfig) -> float:
    """An input backward more when the clean term's weight gradients cannot come with the
    gradient query (methods.clean_forward_with_grad: fp16 or label smoothing)."""
    return 1.0 if (c.speed.amp == "fp16" or c.loss.label_smoothing) and c.loss.clean_weight else 0.0


def _fgsm_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # FGSM-RS queries at a random point, so the clean term needs its own pass
    return (5.0 + 3 * _w(c), 0.0) if c.attack.random_start else (5.0 + _w(c) + _split_clean(c), 0.0)


def _l2l_forwards(c: ResolvedConfig) -> tuple[float, float]:
    two_step, due = c.method == "2step-l2l", 1.0 / c.attacker.every  # share of batches the attacker learns on
    if c.method == "naive-l2l":  # attacker, adversarial forward and backward, attacker backward; clean term apart
        cls, att = 3.0 + 3 * _w(c), 1.0 + 2 * due
    else:  # + the gradient query (forward, input backward; weight gradients of the clean term with it)
        cls, att = 5.0 + _w(c) + _split_clean(c), 1.0 + 2 * due
    if two_step:  # a second query and a second attacker pass, backward through both
        cls, att = cls + 2, att + 1 + 2 * due
    if c.attacker.update == "alternating":  # the attacker's step: one more forward and input backward
        cls += 2 * due
    extra = (c.attacker.steps - 1) * due  # each: the perturbation, forward, input backward, attacker backward
    return cls + extra * (4.0 if two_step else 2.0), att + extra * (6.0 if two_step else 3.0)


def _sdi_defaults(steps: int) -> dict[str, Default]:
    """The learned starts' defaults, with `steps` signed-gradient steps after the start."""
    return {
        "attacker": Default(lambda c: "sdi", "sdi"),
        # The authors update it every 20 batches; on digits every 5 keeps 0.476 ± 0.022 under
        # autoattack-fast against 0.406 ± 0.015 for every 20 (every batch: 0.470 ± 0.027; 3
        # seeds each, docs/results.md, "Learned starts").
        "attacker_every": Default(lambda c: 5, "5"),
        "pgd_steps": Default(lambda c: steps, str(steps)),
        "step_size": Default(lambda c: c.eps / c.pgd_steps, "eps / --pgd-steps"),  # after pgd_steps: uses it
    }


def _first_visit(ctx: StepContext, x: Tensor, y: Tensor, grad: Tensor | None) -> Tensor:
    """fgsm-sdi-memory's point as an evaluation attack (`l2l:DIR`): an image seen for the first
    time, so its remembered perturbation is zero (what training's memory starts at)."""
    return sdi_perturbation(ctx, x, y, grad, torch.zeros_like(x))


def _sdi_image_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # a forward and input backward per step, the trained forward and backward; the clean term apart
    return 2.0 * c.attack.pgd_steps + 3.0 + 3 * _w(c), 1.0 + 2.0 / c.attacker.every


def _sdi_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # the clean query, a forward and input backward per step, the trained forward and backward
    return 2.0 + _w(c) + _split_clean(c) + 2.0 * c.attack.pgd_steps + 3.0, 1.0 + 2.0 / c.attacker.every


# Per-method defaults. Step sizes follow each method's reference: the paper's PGM 0.01 at
# 0.03 (eps/3), Madry's 2/255 at 8/255 (eps/4), TRADES' and MART's 0.007 at 0.031.
KL_METHOD_STEP = 0.007 / 0.031
_KL_DEFAULTS = {"step_size": _eps_times(KL_METHOD_STEP, "0.007/0.031 eps")}
_L2L_DEFAULTS = {"attacker": Default(lambda c: "slim", "slim"), "attacker_every": Default(lambda c: 1, "1")}

METHOD_RECORDS: dict[str, Method] = {m.name: m for m in [
    Method("plain", plain_step, "clean training", lambda c: (3.0, 0.0), colour="tab:gray", marker="o"),
    Method("fgsm", fgsm_step, "FGSM training (Goodfellow et al.); with --random-start FGSM-RS (Wong et al. 2020)",
           _fgsm_forwards, defaults={
               "clean_weight": Default(lambda c: 0.5, "0.5"),
               "step_size": Default(lambda c: 1.25 * c.eps if c.random_start else c.eps,
                                    "eps, 1.25 eps with --random-start")},
           options=frozenset({"random_start"}), colour="tab:orange", marker="v"),
    Method("n-fgsm", n_fgsm_step, "N-FGSM (de Jorge et al. 2022): noise of 2 eps, an FGSM step of eps, no projection",
           lambda c: (5.0 + 3 * _w(c), 0.0),
           defaults={"step_size": _eps_times(1.0, "eps"), "noise": _eps_times(2.0, "2 eps")},
           options=frozenset({"noise"}),
           unsupported_norms={"l2": "de Jorge et al. define N-FGSM for l-inf only (per-pixel noise of 2 eps, a "
                                    "signed step, no projection); use fgsm-sdi or pgd-at under l2"},
           colour="tab:olive", marker="<"),
    Method("pgd", pgd_step, "the paper's PGM net: PGD-10 from zero, step eps/3, clean weight 0.5",
           lambda c: (2.0 * c.attack.pgd_steps + 3 + 3 * _w(c), 0.0),
           defaults={"clean_weight": Default(lambda c: 0.5, "0.5"), "step_size": _eps_times(1 / 3, "eps/3")},
           options=frozenset({"random_start", "pgd_steps"}), colour="tab:brown", marker="s"),
    Method("pgd-at", pgd_at_step, "PGD-AT (Madry et al. 2018): PGD-10 from a random start, step eps/4",
           lambda c: (2.0 * c.attack.pgd_steps + 3 + 3 * _w(c), 0.0),
           defaults={"step_size": _eps_times(1 / 4, "eps/4")}, options=frozenset({"pgd_steps"}),
           colour="tab:red", marker="D"),
    Method("trades", trades_step, "TRADES (Zhang et al. 2019): clean CE + beta x KL to a KL-PGD-10 point",
           lambda c: (2.0 * c.attack.pgd_steps + 7, 0.0),  # TRADES' attack first fixes the clean prediction
           defaults={**_KL_DEFAULTS, "beta": Default(lambda c: 6.0, "6")},
           options=frozenset({"beta", "pgd_steps"}), colour="tab:purple", marker="P"),
    Method("mart", mart_step, "MART (Wang et al. 2020): boosted CE + beta x KL weighted by misclassification",
           lambda c: (2.0 * c.attack.pgd_steps + 6, 0.0),
           defaults={**_KL_DEFAULTS, "beta": Default(lambda c: 5.0, "5")},
           options=frozenset({"beta", "pgd_steps"}), colour="tab:pink", marker="X"),
    Method("naive-l2l", l2l_step, "the paper's Naive L2L: the attacker sees the image", _l2l_forwards,
           attacker_sees="image", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS, options=_PAPER_L2L,
           colour="#aec7e8", marker="h"),
    Method("grad-l2l", l2l_step, "the paper's Grad L2L: the attacker sees the image and its loss gradient",
           _l2l_forwards, attacker_sees="image+gradient", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS,
           options=_PAPER_L2L | {"grad_norm"}, colour="tab:blue", marker="^"),
    Method("2step-l2l", l2l_step, "the paper's 2-Step L2L: the Grad attacker applied twice", _l2l_forwards,
           attacker_sees="image+gradient", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS,
           options=_PAPER_L2L | {"grad_norm"}, colour="tab:cyan", marker=">"),
    Method("fgsm-sdi", fgsm_sdi_step, "FGSM-SDI (Jia et al. 2022): a learned start, then an FGSM step of eps",
           _sdi_forwards, attacker_sees="image+gradient", perturbation=sdi_perturbation,
           defaults=_sdi_defaults(1),
           options=_L2L | {"pgd_steps"}, colour="tab:green", marker="*"),
    # Two learned starts beyond FGSM-SDI (learn2defend's own designs, docs/results.md, "A learned
    # start that remembers"), both with two signed-gradient steps of eps / 2 after the start (the
    # best learned design measured before them):
    Method("fgsm-sdi-image", fgsm_sdi_step, "a learned start from the image alone (no clean gradient "
           "query), then two signed-gradient steps of eps / 2", _sdi_image_forwards, attacker_sees="image",
           perturbation=sdi_perturbation, defaults=_sdi_defaults(2),
           options=_L2L | {"pgd_steps"}, colour="#c5b0d5", marker="H"),
    Method("fgsm-sdi-memory", fgsm_sdi_step, "a learned update of the image's perturbation from its last "
           "visit (per-image memory), seeing image and clean gradient too; then two steps of eps / 2",
           _sdi_forwards, attacker_sees="image+gradient+memory", perturbation=_first_visit,
           defaults=_sdi_defaults(2), options=_L2L | {"pgd_steps"},
           per_image_memory="perturbation", colour="#c49c94", marker="8"),
    Method("liet", liet_step, "LIET (ICCV 2025): a class-wise start from the grey image's gradient, partly noise, "
           "refreshed every K batches; an FGSM step of eps; + a growing Jensen-Shannon term", _liet_forwards,
           defaults={"step_size": _eps_times(1.0, "eps"), "start_every": Default(lambda c: 20, "20"),
                     "js_weight": Default(lambda c: 100.0, "100")},
           options=frozenset({"start_every", "js_weight"}),
           unsupported_norms={"l2": "LIET is defined for l-inf only (per-pixel signed class-wise starts, pixels "
                                    "replaced by uniform noise); use fgsm-sdi or pgd-at under l2"},
           colour="#98df8a", marker="p"),
    Method("fgsm-pgi", fgsm_pgi_step, "FGSM-PGI (Jia et al. 2022): each image starts from its last perturbation "
           "(a per-image memory), an FGSM step of eps, MSE consistency x 10",
           lambda c: (7.0 + 3 * _w(c), 0.0),  # query, input backward, training forward, backward through both
           defaults={"step_size": _eps_times(1.0, "eps"), "pgi_lambda": Default(lambda c: 10.0, "10"),
                     "pgi_decay": Default(lambda c: 0.3, "0.3"), "pgi_reset": Default(lambda c: 40, "40")},
           options=frozenset({"pgi_lambda", "pgi_decay", "pgi_reset"}),
           per_image_memory="perturbation+momentum", epoch_start=pgi_epoch_start, colour="#ffbb78", marker="d"),
]}

# The step of each method by name; the loop looks its step up here.
STEPS: dict[str, Callable[[StepContext, Tensor, Tensor], Metrics]] = {
    name: m.step for name, m in METHOD_RECORDS.items()
}


# The figures' palette: matplotlib's tab10, then tab20's lighter shades (20 colours), and its
# filled markers; a record without its own colour and marker takes the first ones no record holds.
STYLE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:gray", "tab:olive", "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
                 "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
STYLE_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8")


def method_styles(records: dict[str, Method] | None = None) -> dict[str, tuple[str, str]]:
    """{method name: (colour, marker)} for every record of `records` (default METHOD_RECORDS):
    the record's own, else, in record order, the first palette colour and the first marker no
    record holds yet (once either runs out, the first (colour, marker) pair none holds), so
    every method's pair is its own and a new record gets one without a line of its own."""
    records = METHOD_RECORDS if records is None else records
    styles = {name: (m.colour, m.marker) for name, m in records.items() if m.colour and m.marker}
    for name, m in records.items():
        if name in styles:
            continue
        colours = {c for c, _ in styles.values()}
        markers = {k for _, k in styles.values()}
        held = set(styles.values())
        colour = m.colour or next((c for c in STYLE_COLOURS if c not in colours), "")
        marker = m.marker or next((k for k in STYLE_MARKERS if k not in markers), "")
        if colour and not marker:  # every marker taken: a new colour with any marker is new
            marker = next((k for k in STYLE_MARKERS if (colour, k) not in held), "")
        if marker and not colour:
            colour = next((c for c in STYLE_COLOURS if (c, marker) not in held), "")
        if not colour or not marker or (colour, marker) in held:
            pairs = [(c, k) for k in ((m.marker,) if m.marker else STYLE_MARKERS)
                     for c in ((m.colour,) if m.colour else STYLE_COLOURS)]
            colour, marker = next((p for p in pairs if p not in held), pairs[0])
        styles[name] = (colour, marker)
    return {name: styles[name] for name in records}


def list_methods(pattern: str = "*") -> list[str]:
    """Method names matching the shell-style `pattern` (e.g. "*fgsm*"), in registry order."""
    return [name for name in METHOD_RECORDS if fnmatch.fnmatchcase(name, pattern)]


def attacker_in_channels(method: str, image_channels: int) -> int:
    """The attacker's input channels: the image's for each thing it sees (the naive attacker:
    the image; the gradient attackers: image and gradient; fgsm-sdi-memory: image, gradient and
    the remembered perturbation)."""
    return image_channels * len(METHOD_RECORDS[method].attacker_sees.split("+"))
