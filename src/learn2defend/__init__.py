"""learn2defend: adversarial training with learned attackers, and honest evaluation.

    from learn2defend import TrainConfig, train, load
    run = train(TrainConfig(dataset="digits", model="smallcnn", method="grad-l2l", out="runs/g"))
    model = load("runs/g")          # an nn.Module taking [0, 1] images
"""

from .config import TrainConfig
from .errors import UserError
from .evaluate import EvalConfig, evaluate
from .export import load
from .runs import Run, load_run
from .train import train
from .version import __version__

__all__ = ["TrainConfig", "EvalConfig", "Run", "UserError", "evaluate", "load", "load_run", "train", "__version__"]
