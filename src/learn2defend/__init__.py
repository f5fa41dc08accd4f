"""learn2defend: adversarial training with learned attackers, and honest evaluation.

    from learn2defend import TrainConfig, train, load
    run = train(TrainConfig(dataset="digits", model="smallcnn", method="grad-l2l", out="runs/g"))
    model = load("runs/g")          # an nn.Module taking [0, 1] images
    evaluate_model(model, images, labels, attacks=["pgd10"], eps=0.2)  # any nn.Module
"""

from .config import TrainConfig
from .errors import UserError
from .evaluate import EvalConfig, evaluate, evaluate_model
from .export import load
from .runs import Run, load_run
from .settings import ResolvedConfig
from .train import train
from .version import __version__

__all__ = [
    "TrainConfig", "ResolvedConfig", "EvalConfig", "Run", "UserError", "evaluate", "evaluate_model", "load",
    "load_run", "train", "__version__",
]
