"""Evaluation attacks (`attack(model, images, labels) -> adversarial images`) and the
functional cores (`fgsm_delta`, `pgd_delta`, `kl_pgd_delta`) that the training methods reuse.

Attacks work under a threat model (`threat.THREAT_MODELS`: l-inf, the default, or l2), with
radius eps in pixel units, on images in [0, 1].
"""

from .auto import AutoAttack
from .base import (
    FGSM,
    NONFINITE_GRADIENT_WARNING,
    PGD,
    Attack,
    check_eps,
    check_images,
    check_labels,
    correct_predictions,
    in_model_dtype,
    model_state_kept,
    num_classes,
)
from .cw import CWLinf
from .functional import fgsm_delta, kl_pgd_delta, margin_loss, pgd_delta, project
from .registry import ATTACK_FORMS, list_attack_names, make_attack, register_attack_prefix
from .threat import NORMS, THREAT_MODELS, ThreatModel, threat_model

__all__ = [
    "ATTACK_FORMS",
    "Attack",
    "AutoAttack",
    "CWLinf",
    "FGSM",
    "NONFINITE_GRADIENT_WARNING",
    "NORMS",
    "PGD",
    "THREAT_MODELS",
    "ThreatModel",
    "check_eps",
    "check_images",
    "check_labels",
    "correct_predictions",
    "in_model_dtype",
    "fgsm_delta",
    "kl_pgd_delta",
    "list_attack_names",
    "make_attack",
    "margin_loss",
    "model_state_kept",
    "num_classes",
    "pgd_delta",
    "project",
    "register_attack_prefix",
    "threat_model",
]
