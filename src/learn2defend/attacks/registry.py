"""Attack names -> attack objects: `make_attack("pgd10", eps=8/255)`."""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable
from typing import Any

from learn2defend.errors import UserError

from .auto import AutoAttack
from .base import FGSM, PGD, Attack, check_eps
from .cw import CWLinf
from .threat import ThreatModel, threat_model

ATTACK_FORMS: dict[str, str] = {
    "fgsm": "FGSM, one step of size eps (under l2: FGM, one normalized-gradient step)",
    "pgdK": "PGD, K steps, random start, step 2.5*eps/K (Madry); e.g. pgd10, pgd50",
    "pgmK": "the paper's PGM: K steps from zero, step eps/3 (0.01 at eps 0.03); e.g. pgm10 "
            "(under l2 the same recipe with normalized-gradient steps)",
    "cwpgdK": "PGD with the CW margin loss, random start, step 2.5*eps/K; e.g. cwpgd20",
    "cw": "the paper's CW-linf (least-norm, c auto-tuned, at most 100 iterations; l-inf only)",
    "autoattack": "standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square)",
    "autoattack-fast": "APGD-CE + APGD-T only",
    "autoattack-rand": "AutoAttack for randomized defenses (pyautoattack version='rand': APGD-CE + APGD-DLR, "
                       "gradients averaged over 20 draws)",
    "l2l:DIR": "the learned attacker saved in run folder DIR",
}

AttackFactory = Callable[..., Attack]  # factory(rest_of_name, eps, **options) -> Attack
# Names starting with a prefix are built by a factory in another module, given as
# "module:function" and imported on first use: the learned attacker needs the run folders and
# the training steps, which the attacks themselves do not.
_PREFIXES: dict[str, AttackFactory | str] = {"l2l:": "learn2defend.learned_attack:attack_factory"}


def register_attack_prefix(prefix: str, factory: AttackFactory | str) -> None:
    """Let another module handle names starting with `prefix` (e.g. "l2l:").

    `factory(rest, eps, **options)` gets the name without the prefix (and `norm=`, the
    threat model, when make_attack was given one); a string
    "module:function" names it, imported when such a name is first built.
    """
    _PREFIXES[prefix.lower()] = factory


def _factory(prefix: str) -> AttackFactory:
    factory = _PREFIXES[prefix]
    if isinstance(factory, str):
        module, function = factory.split(":")
        factory = _PREFIXES[prefix] = getattr(importlib.import_module(module), function)
    return factory


def list_attack_names(pattern: str = "*") -> list[str]:
    """The accepted name forms matching the shell-style `pattern` (K = a positive number of steps)."""
    return [name for name in ATTACK_FORMS if fnmatch.fnmatchcase(name, pattern)]


def _forms() -> str:
    return "; ".join(f"{k} ({v})" for k, v in ATTACK_FORMS.items())


def _options(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    bad = sorted(set(options) - set(allowed))
    if bad:
        ok = ", ".join(allowed) or "none"
        raise UserError(f"attack {name!r} does not take option(s) {', '.join(bad)}; it takes: {ok}")
    return options


def make_attack(name: str, eps: float, norm: str | ThreatModel | None = None, **options: Any) -> Attack:
    """Build an attack from its name under the threat model `norm` ("linf", the default, or
    "l2": learn2defend.attacks.threat); options (step_size, random_start, restarts, steps,
    and seed/batch_size for AutoAttack) override the name's defaults where they apply.
    An attack not defined for the norm (cw under l2) is refused with a UserError."""
    if not isinstance(name, str):
        raise UserError(f"attack name must be a string, got {name!r}")
    threat = threat_model(norm)
    key = name.strip().lower()
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            given = {} if norm is None else {"norm": threat}  # factories that predate --norm keep working
            return _factory(prefix)(name.strip()[len(prefix) :], check_eps(eps, threat), **given, **options)
    eps = check_eps(eps, threat)
    if key == "fgsm":
        return FGSM(eps, **_options(key, options, ("step_size", "random_start")), norm=threat)
    if key == "cw":
        if threat.name not in CWLinf.norms:
            raise UserError(f"attack 'cw' is the paper's CW-linf, defined for l-inf only; under {threat.label} "
                            "use cwpgdK (PGD on the CW margin loss), e.g. cwpgd20")
        return CWLinf(eps, **_options(key, options, ("steps", "step_size")))
    if key in ("autoattack", "autoattack-fast", "autoattack-rand"):
        opts = _options(key, options, ("seed", "batch_size"))
        version = "standard" if key == "autoattack" else key.removeprefix("autoattack-")
        return AutoAttack(eps, version, **opts, norm=threat)
    m = re.fullmatch(r"(cwpgd|pgd|pgm)([0-9]+)", key)
    if m and int(m[2]) >= 1:
        kind, steps = m[1], int(m[2])
        opts = _options(key, options, ("steps", "step_size", "random_start", "restarts"))
        steps = opts.pop("steps", steps)
        if kind == "pgm":  # the paper's PGM: zero start, eta = 0.01 at eps = 0.03
            opts = {"random_start": False, "step_size": eps / 3 if eps > 0 else None} | opts
        loss = "margin" if kind == "cwpgd" else "ce"
        return PGD(eps, steps, **opts, loss=loss, name=key, norm=threat)
    raise UserError(f"unknown attack {name!r}; valid forms: {_forms()}")
