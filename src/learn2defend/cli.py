"""Command line: parse, validate, call the library. Nothing else lives here.

Bad input ends with one line on stderr and exit code 2 (argparse errors included);
results go to stdout, progress and logs to stderr, so `--json` output can be piped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .compare import CompareConfig
from .config import ATTACKER_WIDTH_HELP, DATA_DIR_HELP, DEVICE_HELP, SWITCH_HELP, TrainConfig, parse_fraction
from .errors import UserError
from .evaluate import EvalConfig, TransferConfig
from .export import ExportConfig
from .methods import METHOD_RECORDS
from .version import __version__

HELP = {
    "out": "run folder to create (or continue with --resume)",
    "dataset": "digits | mnist | cifar10 | cifar100 | svhn | folder:PATH | imagenet:PATH | fake:CxHxW:K",
    "data_dir": DATA_DIR_HELP,
    "download": "download a torchvision data set if it is missing (needs internet)",
    "image_size": "resize folder images to this size (in memory), or crop streamed images to it (imagenet: 224)",
    "val_size": "validation split carved from the training set: fraction or count",
    "split_seed": "seed of the validation split",
    "train_size": "train on the first N training images only (a random subset, for CPU-sized runs)",
    "augment": "random crop and flip on the device, as --crop-padding and --flip say (--no-augment: neither)",
    "flip": "random horizontal flips; turn them off where a mirrored image is another class (digits, text)",
    "crop_padding": "random crops from the image zero-padded by this many pixels (0: no crops)",
    "model": "classifier name (see `learn2defend models`), or timm:NAME for any timm model (extra: learn2defend[timm])",
    "method": "; ".join(f"{name}: {m.help}" for name, m in METHOD_RECORDS.items()),
    "eps": "radius in pixel units under --norm: l-inf e.g. 0.03 or 8/255; l2 (the perturbation's Euclidean "
           "length) e.g. 0.5",
    "norm": "threat model: linf | l2 (learn2defend.attacks.threat; RobustBench's CIFAR-10 boards: linf 8/255, "
            "l2 0.5)",
    "init": "run folder whose classifier starts this run (the paper starts from a plain net)",
    "pretrained": "timm: models: weights to start from: a .safetensors file, a timm or torch checkpoint "
                  "(.pth, read weights-only), or 'hub' (timm's download, online); a head for another number "
                  "of classes is re-initialized, and the normalization inside is the weights' own",
    "optimizer": "sgd | adam",
    "betas": "Adam betas",
    "lr_milestones": "epochs after which the learning rate is multiplied by --lr-gamma",
    "clean_weight": "weight of the clean loss",
    "pgd_steps": "attack iterations of --method pgd, pgd-at, trades and mart; fgsm-sdi*: steps after the learned start",
    "noise": "n-fgsm: half-width of the uniform noise before the FGSM step, in pixels (e.g. 16/255)",
    "pgi_lambda": "fgsm-pgi: weight of the mean squared difference between the logits at the remembered start "
                  "and at the training point",
    "pgi_decay": "fgsm-pgi: decay of the per-image momentum of L1-normalized input gradients",
    "pgi_reset": "fgsm-pgi: reset the per-image memory (random corners of the ball, momentum 0) every this many "
                 "epochs",
    "label_smoothing": "label smoothing of the classifier's training cross-entropy (attacks use plain CE); "
                       "FGSM-SDI's code uses 0.111 (its factor 0.9)",
    "ema": "keep an exponential moving average of the classifier's weights (and batch-norm statistics) with "
           "this decay, e.g. 0.999; validation, best, eval and export then use the averaged weights",
    "attacker_every": "update the attacker every K batches (learned-attacker methods)",
    "step_size": "attack step size of the training attack, in pixels",
    "random_start": "uniform random start: FGSM-RS (Wong et al. 2020) with --method fgsm; PGD from a random "
                    "point with --method pgd (pgd-at always starts at one)",
    "beta": "trades, mart: weight of the KL term against the clean (trades) or boosted (mart) cross-entropy",
    "start_every": "liet: refresh the class-wise starts (the grey image's input gradient per class) every K "
                   "batches of an epoch",
    "js_weight": "liet: weight of the Jensen-Shannon term between the start's and the final point's "
                 "predictions in the last epoch; epoch e of E uses (e + 1) / E of it",
    "attacker": "slim | wide (the paper's Table 1) | sdi (FGSM-SDI's generator)",
    "attacker_width": ATTACKER_WIDTH_HELP,
    "attacker_scale": "attacker output tanh(s*h) with a learnable s starting at 5 (authors' code)",
    "attacker_optimizer": "sgd | adam (adam: lr 1e-3, no weight decay, fixed; sgd takes the "
                          "classifier's lr, momentum, weight decay and schedule, as in the paper)",
    "attacker_steps": "attacker updates per classifier update",
    "grad_norm": "conditioning of the attacker's gradient input: sample | batch | sign | none",
    "l2l_update": "joint (one backward) | alternating (classifier step, then attacker step; authors' code)",
    "device": "auto | cpu | cuda | cuda:N",
    "val_robust_n": "validation images attacked with PGD-10 after each epoch (0: none)",
    "checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "progress": "progress bar on a terminal",
    "on_bad_image": "folder image files that cannot be decoded: skip (warn, count) | fail",
    "loader": "auto: in memory on the device where the decoded set fits, else streamed from its files | memory | "
              "stream (folder:PATH and imagenet:PATH: DataLoader decode workers, RandomResizedCrop + flip)",
    "workers": "decode workers of a streamed data set",
    "on_nonfinite": "non-finite loss: stop (keep the last good checkpoint, exit 2) | skip (drop that step)",
    "sync_bn": "under torchrun on GPUs: batch-norm statistics over all processes (SyncBatchNorm)",
    "tensorboard": "also write each epoch's metrics to RUN/tensorboard/ (pip install 'learn2defend[tensorboard]')",
    "epochs": "training epochs (with --init: adversarial epochs after the plain net)",
    "batch_size": "images per step (per process under torchrun)",
    "lr": "the classifier's learning rate",
    "momentum": "SGD momentum (classifier; the attacker's too with --attacker-optimizer sgd)",
    "weight_decay": "the classifier's weight decay",
    "lr_gamma": "factor applied to the learning rate at each of --lr-milestones",
    "lr_schedule": "the classifier's learning-rate schedule: multistep (per epoch: --lr-milestones, --lr-gamma) | "
                   "cosine (per batch, from --lr down to 0) | onecycle (per batch: Wong et al. 2020's cyclic "
                   "schedule, linear up to --lr at 2/5 of training, then linear down to 0); the attacker's "
                   "stays multistep",
    "attacker_lr": "the attacker's learning rate",
    "attacker_momentum": "the attacker's SGD momentum",
    "attacker_weight_decay": "the attacker's weight decay",
    "attacker_lr_milestones": "epochs after which the attacker's learning rate is multiplied by --lr-gamma",
    "seed": "seed of weights, data order, augmentation and random starts",
    **SWITCH_HELP,
}

def _per_method(name: str) -> str:
    """The methods' defaults of a config field, from their records: 'eps/4 for pgd-at, ...'."""
    by_text: dict[str, list[str]] = {}
    for method, m in METHOD_RECORDS.items():
        if name in m.defaults:
            by_text.setdefault(m.defaults[name].text, []).append(method)
    texts = [f"{text} for {', '.join(methods)}" for text, methods in by_text.items()]
    fallback = {"clean_weight": "0 for the others", "pgd_steps": "10 for the others"}.get(name)
    return ", ".join(texts + ([fallback] if fallback else []))


# What a None default of a TrainConfig field resolves to (TrainConfig.resolve), for --help.
NONE_DEFAULTS = {
    "image_size": "the images' own size",
    "workers": "the CPUs, at most 8",
    "train_size": "every training image",
    "eps": "per data set: digits 0.2, mnist 0.3, svhn 0.05, others 0.03; under --norm l2: digits 1.0, "
           "mnist 2.0, others 0.5",
    "init": "none, random initial weights",
    "pretrained": "none, random initial weights",
    "flip": "per data set: on for folders and CIFAR, off for digits, MNIST and SVHN",
    "crop_padding": "per data set: 4 for CIFAR and SVHN, 2 for MNIST, 1/8 of the image size for folders, 0 for digits",
    **{name: _per_method(name) for name in ("clean_weight", "step_size", "beta", "noise", "pgd_steps",
                                            "pgi_lambda", "pgi_decay", "pgi_reset",
                                            "attacker", "attacker_every", "start_every", "js_weight")},
    "ema": "off",
    "attacker_optimizer": "adam",
    "attacker_lr": "1e-3 with adam, --lr with sgd",
    "attacker_momentum": "--momentum",
    "attacker_weight_decay": "0 with adam, --weight-decay with sgd",
    "attacker_lr_milestones": "none with adam, --lr-milestones with sgd",
    "channels_last": "per device: on for the CPU, off for CUDA (learn2defend.speed.DEVICE_DEFAULTS)",
    "compile": "per device: off on the CPU (no faster there) and on CUDA (docs/performance.md)",
    "tf32": "on for CUDA",
    "cudnn_benchmark": "off for CUDA",
}


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its real default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            shown = action.option_strings[0 if default else 1]  # --flag or --no-flag
        elif default is False:  # a plain switch: off unless given
            return text
        elif isinstance(default, (list, tuple)):
            shown = ",".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%') or 'none'})".strip()


# torchrun's own options (torch.distributed.run, PyTorch 2.x; each long one also with
# underscores). torchrun reads every option of its command line, those after `-m learn2defend`
# included, and takes a prefix of one of its options for that option: `--n` is "ambiguous"
# (--nnodes, --nproc-per-node, ...) and stops torchrun before learn2defend starts. So no
# learn2defend option may be a prefix of one of these; a short spelling that is one may stay
# as a second name, for use outside torchrun (`--n-images`, and `--n`). tests/test_cli.py
# checks this list against torchrun's parser.
TORCHRUN_OPTIONS = (
    "-h", "--help", "--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
    "--rdzv-conf", "--standalone", "--max-restarts", "--monitor-interval", "--start-method",
    "--event-log-handler", "--role", "-m", "--module", "--no-python", "--run-path", "--log-dir", "-r",
    "--redirects", "-t", "--tee", "--log-line-prefix-template", "--local-ranks-filter",
    "--duplicate-stdout-filters", "--duplicate-stderr-filters", "--node-rank", "--master-addr",
    "--master-port", "--local-addr", "--logs-specs", "--numa-binding", "--signals-to-handle",
    "--shutdown-timeout", "--virtual-local-rank", "--print-completion",
)
_TORCHRUN_ALL = {*TORCHRUN_OPTIONS, *("--" + o[2:].replace("-", "_") for o in TORCHRUN_OPTIONS if o.startswith("--"))}


def torchrun_could_take(option: str) -> bool:
    """Whether torchrun's parser could take `option`, given after `-m learn2defend`, for one of
    its own options (a prefix of one; argparse's -h/--help excepted, which torchrun passes on)."""
    if option in ("-h", "--help"):
        return False
    if not option.startswith("--"):  # -x: torchrun's -m, -r, -t, also with a value attached (-mVALUE)
        return option[:2] in _TORCHRUN_ALL
    return any(theirs.startswith(option) for theirs in _TORCHRUN_ALL)


class _Parser(argparse.ArgumentParser):
    """One-line errors, real defaults in --help, and option names torchrun passes on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """argparse's, refusing an option whose first name torchrun could take (see
        TORCHRUN_OPTIONS); a further name it could take is kept, and its help says so."""
        unsafe = [o for o in args if isinstance(o, str) and o.startswith("-") and torchrun_could_take(o)]
        if unsafe and args[0] in unsafe:
            raise ValueError(f"option {args[0]} is a prefix of a torchrun option; give it a first name "
                             "torchrun cannot take (the short one may stay as a second name)")
        action = super().add_argument(*args, **kwargs)
        if unsafe:
            action.help = (f"{action.help or ''} ({', '.join(unsafe)}: the same, except under torchrun, "
                           "which takes it for its own)").strip()
        return action

    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


IMPORT_HELP = ("import this module first, so that the models it registers with @register_model can be used "
               "(repeatable; the current folder and PYTHONPATH are searched) (default: none)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got '{text}'") from None
    return a, b


def _number(text: str) -> float:
    try:
        return parse_fraction(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _val_size(text: str) -> float:
    value = _number(text)
    return int(value) if math.isfinite(value) and value >= 1 and value == int(value) else value


_TYPES = {"int": int, "float": _number, "str": str, "list[int]": _int_list, "list[str]": lambda s: _names(s),
          "tuple[float, float]": _float_pair}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """One --flag per field of the config dataclass, so the CLI and the config never drift."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base = f.type.replace(" | None", "")
        text = HELP[f.name] + (f" (default: {NONE_DEFAULTS[f.name]})" if default is None else "")
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        kind = _val_size if f.name == "val_size" else _TYPES[base]
        parser.add_argument(flag, type=kind, default=default, metavar=base.split("[")[0].upper(), help=text)


_PARSERS = {"comma_list": lambda s: [a for a in s.split(",") if a]}  # option(parse=...): eval's --attacks


def _option_type(f: dataclasses.Field) -> Any:
    """The argparse type of an option field: its `parse`, else its type's (a list's items' with nargs)."""
    if f.metadata["parse"]:
        return _PARSERS[f.metadata["parse"]]
    base = f.type.replace(" | None", "")
    if f.metadata["nargs"] is not None and base.startswith("list["):
        base = base[len("list["):-1]
    return _TYPES[base]


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `cls` declared with config.option, named, typed, defaulted and
    described there (the class's FLAG_HELP words an inherited one for its command); a field
    without a default is a required option. The class's own fields come first in --help."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("help")]
    own = set(vars(cls).get("__annotations__", {}))
    for f in sorted(fields, key=lambda f: f.name not in own):
        meta = f.metadata
        text = getattr(cls, "FLAG_HELP", {}).get(f.name) or meta["help"]
        text = text() if callable(text) else text
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        options: dict[str, Any] = {"help": text}
        if f.type in ("bool", "bool | None"):  # None: neither --flag nor --no-flag given
            options["action"] = "store_true" if meta["switch"] else argparse.BooleanOptionalAction
        else:
            options.update(type=_option_type(f), **{k: meta[k] for k in ("metavar", "nargs") if meta[k] is not None})
        if not required:
            options["default"] = default
        if meta["positional"]:
            parser.add_argument(f.name, **options)
        else:
            names = [meta["flag"] or "--" + f.name.replace("_", "-"), *meta["aliases"]]
            parser.add_argument(*names, dest=f.name, **({"required": True} if required else {}), **options)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config `cls` of the parsed options that add_config_options made for it."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            value = getattr(args, f.name)
            values.update(f.metadata["from_cli"](value) if f.metadata["from_cli"] else {f.name: value})
    return cls(**values)


def _json_option(parser: argparse.ArgumentParser, text: str = "print one JSON object on stdout, nothing else") -> None:
    parser.add_argument("--json", action="store_true", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="learn2defend",
                     description="Adversarial training with learned attackers, and honest evaluation.")
    parser.add_argument("--version", action="version", version=f"learn2defend {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a classifier with one of the methods",
                       description="Train a classifier. Options come from the flags, or from a recipe file "
                       "(--config FILE: JSON, TOML or YAML, e.g. a run's own config.json) with the flags "
                       "given overriding it.")
    p.add_argument("--config", metavar="FILE", help="start from the options in FILE (.json, .toml, .yaml/.yml: one "
                   "table of option names such as lr, pgd_steps; a run's own config.json works); flags given "
                   "override it (default: none, the flags alone)")
    _add_dataclass_options(p, TrainConfig, skip=set())
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "its own config.json: other options may be left out; given, they must agree with the run, "
                   "except those that may change on resume (--epochs, --device, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")

    p = sub.add_parser("eval", help="accuracy of a trained run, clean and under attacks")
    add_config_options(p, EvalConfig)
    _json_option(p)
    _add_eval_commands(sub)

    p = sub.add_parser("compare", help="train several methods alike and tabulate clean and robust accuracy")
    _add_dataclass_options(p, TrainConfig, skip={"out", "method", "init"})
    add_config_options(p, CompareConfig)
    _json_option(p, "print the rows as JSON instead of a table")

    p = sub.add_parser("demo", help="the digits comparison of every method (about 2 minutes on a 2-core CPU)")
    p.add_argument("--out", default="runs/demo", help="folder holding one run folder per method")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)

    _add_speed_commands(sub)
    _add_reproduce_commands(sub)

    p = sub.add_parser("export", help="the trained classifier of a run as one weights-only safetensors file")
    add_config_options(p, ExportConfig)
    _json_option(p, "print the metadata written as one JSON object")

    p = sub.add_parser("models", help="list the registered classifiers")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'wrn*' (default: all built-in "
                   "and registered models); 'timm:*resnet*': timm's models")
    for p in sub.choices.values():  # also after the subcommand: `learn2defend train --import mymodels ...`
        p.add_argument("--import", dest="sub_imports", action="append", default=[], metavar="MODULE",
                       help=IMPORT_HELP)
    return parser


def _add_speed_commands(sub) -> None:
    """bench (each method's step, timed alike) and doctor (the machine, and bench with each switch)."""
    from .bench import BenchConfig
    from .doctor import DoctorConfig

    p = sub.add_parser("bench", help="seconds per training step of each method, timed alike")
    add_config_options(p, BenchConfig)
    _json_option(p)

    p = sub.add_parser("doctor", help="versions, device, and every method's speed with each speed switch "
                       "(run this on a new machine, a GPU one above all)")
    add_config_options(p, DoctorConfig)
    _json_option(p)

    from .gpu_report import GpuReportConfig

    p = sub.add_parser("gpu-report", help="every GPU figure of docs/performance.md in one command (~12 minutes on "
                       "one H100/H200): doctor, the switch combinations and reproduce frontier --preset gpu")
    add_config_options(p, GpuReportConfig)
    _json_option(p, "print the summary as one JSON object")


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


DEMO = {"dataset": "digits", "model": "smallcnn", "epochs": 8, "batch_size": 64, "lr": 0.05,
        "attacker_width": 0.25, "val_robust_n": 0}


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from .compare import ROWS, TABLE, compare, report

    if args.command == "demo":
        base, options = TrainConfig(**DEMO, device=args.device), CompareConfig(out=args.out)
        print(f"training {len(options.methods)} methods on digits ({DEMO}) into {args.out} ...", file=sys.stderr)
    else:
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out", "method", "init"}
        base = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        options = config_from_args(CompareConfig, args)
    rows = compare(base, options.methods, options.attacks, options.out, options.plain_epochs, n=options.n,
                   extend=options.extend)
    print(f"wrote {Path(args.out) / TABLE} and {Path(args.out) / ROWS}", file=sys.stderr)
    if getattr(args, "json", False):
        return {"rows": rows}
    print(report(base, rows))
    return {}


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from .train import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.config is not None:
        if args.resume:
            raise UserError("--config starts a run; --resume continues one with its own config.json: leave one out")
        given = {k: v for k, v in vars(args).items() if k in fields and k in args.given_options}
        config = TrainConfig.from_recipe(args.config, given)
    elif args.resume and not args.overwrite:  # the run's own config.json, with the options given put in
        from pathlib import Path

        from .runs import resume_config
        from .train import RESUMABLE_CHANGES

        given = {k: v for k, v in vars(args).items() if k in fields and k in args.given_options}
        config = resume_config(Path(args.out), given, RESUMABLE_CHANGES | {"batch_size"})
    else:
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run = train(config, resume=args.resume, overwrite=args.overwrite)
    last = run.history[-1] if run.history else {}
    return {"out": str(run.path), "epochs": run.epoch, **{k: v for k, v in last.items() if k != "epoch"}}


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from .evaluate import evaluate

    result = evaluate(config_from_args(EvalConfig, args))
    from .distributed import is_main

    return _eval_report(result, args.json) if is_main() else {}  # under torchrun, rank 0 reports


def _add_eval_commands(sub) -> None:
    """transfer, sweep, show: the evaluation commands besides eval."""
    from .figures import ShowConfig, SweepConfig

    for name, cls, text in (
        ("transfer", TransferConfig, "black-box: attacks crafted on a surrogate run, accuracy of a target run"),
        ("sweep", SweepConfig, "accuracy against PGD iterations or eps (the paper's Figures 3 and 4): CSV + PNG"),
        ("show", ShowConfig, "a PNG grid of clean images, perturbations and adversarial images (Figure 5)"),
    ):
        p = sub.add_parser(name, help=text)
        add_config_options(p, cls)
        _json_option(p)


def _eval_report(result: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """JSON: the result as is. Text: results on stdout, one line per check and a FLAGGED
    line, AutoAttack's warnings on stderr (stdout stays results only)."""
    if as_json:
        return result
    for warning in result.pop("warnings", []):
        print(f"learn2defend: warning: {warning}", file=sys.stderr)
    checks, flagged = result.pop("checks", None), result.pop("flagged", False)
    _print_result(result, False)
    for name, check in (checks or {}).items():
        status = "skipped" if check["passed"] is None else ("pass" if check["passed"] else "FAIL")
        print(f"check {name}: {status}: {check['detail']}")
    if flagged:
        failed = ", ".join(k for k, c in checks.items() if c["passed"] is False)
        print(f"FLAGGED: sanity checks failed ({failed}); the robust accuracies likely overestimate robustness")
    return {}


def _transfer(args: argparse.Namespace) -> dict[str, Any]:
    from .evaluate import transfer

    result = transfer(config_from_args(TransferConfig, args))
    return _eval_report(result, args.json)


def _sweep(args: argparse.Namespace) -> dict[str, Any]:
    from .figures import SweepConfig, sweep

    result = sweep(config_from_args(SweepConfig, args))
    if args.json:
        return result
    print(f"wrote {result['csv']} and {result['png']} (n={result['n']})")
    for r in result["rows"]:
        print(f"{r['label']:>20} {r['attack']:>5} eps {r['eps']:<8.4g} steps {r['steps']:<5} "
              f"{100 * r['accuracy']:6.2f}%")
    return {}


def _show(args: argparse.Namespace) -> dict[str, Any]:
    from .figures import ShowConfig, show

    result = show(config_from_args(ShowConfig, args))
    if args.json:
        return result
    print(f"wrote {result['out']}")
    for image in result["images"]:
        print(" ".join(f"{k} {v}" for k, v in image.items()))
    return {}


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from .bench import BenchConfig, bench, format_table

    result = bench(config_from_args(BenchConfig, args))
    if args.json:
        return result
    print(format_table(result))
    return {}


def _gpu_report(args: argparse.Namespace) -> dict[str, Any]:
    from .gpu_report import GpuReportConfig, gpu_report

    result = gpu_report(config_from_args(GpuReportConfig, args))
    if args.json:
        return result
    print(f"gpu-report: JSON written to {result['out']} ({', '.join(result['steps'])}), {result['seconds']:g} s")
    return {}


def _doctor(args: argparse.Namespace) -> dict[str, Any]:
    from .doctor import DoctorConfig, doctor, format_report

    report = doctor(config_from_args(DoctorConfig, args))
    if args.json:
        return report
    print(format_report(report))
    return {}


def _add_reproduce_commands(sub) -> None:
    """reproduce (the paper's tables and figures) and plot (training curves)."""
    from .reproduce import EXPERIMENTS, EXTRA_EXPERIMENTS, FRONTIER_PRESETS_PUBLIC, PlotConfig

    p = sub.add_parser("reproduce", help="the paper's Tables 2-7 and Figures 3-5, and the robustness-against-cost "
                       "frontier: runs, tables (ours vs paper), PNGs")
    p.add_argument("experiment", choices=[*EXPERIMENTS, *EXTRA_EXPERIMENTS, "all"], metavar="EXPERIMENT",
                   help=f"{', '.join(EXPERIMENTS)}, all (the paper's); frontier (AutoAttack accuracy against "
                   "training seconds of every method, PGD-AT, TRADES and MART included)")
    p.add_argument("--preset", default="cpu", choices=FRONTIER_PRESETS_PUBLIC,
                   help="paper (WRN-34-4, 40 epochs, 5 seeds; a GPU) | cpu (small CNN, few epochs; default) | "
                   "gpu (frontier only: PreAct-ResNet-18 from scratch, about 8 minutes on one H200)")
    p.add_argument("--eps", type=_number, help="frontier only: train and evaluate every method at this radius, "
                   "e.g. 16/255 (default: the data set's); results beside those at the default")
    p.add_argument("--norm", choices=("linf", "l2"), help="frontier only: the threat model every run trains and "
                   "is evaluated under (default: linf); l2 runs and tables go beside the l-inf ones, eps 0.5 on "
                   "CIFAR-10 unless --eps, methods without an l2 form (N-FGSM) left out")
    p.add_argument("--methods", help="frontier only: the rows to run, comma-separated keys or patterns, e.g. "
                   "'fgsm-pgi,liet' or '*sdi*' (default: every row of the preset); an unknown one lists the keys")
    p.add_argument("--seeds", type=int, help="seeds per method, 0..N-1 (default: the preset's; runs already "
                   "trained for a seed are reused)")
    p.add_argument("--out", required=True, help="folder for runs, cached evaluations, tables and figures")
    p.add_argument("--dataset", type=_names,
                   help="data set(s) instead of the paper's, e.g. digits or folder:PATH (default: the paper's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--data-dir", default="data", help=HELP["data_dir"])
    p.add_argument("--download", action="store_true", help="fetch torchvision data sets into --data-dir")
    p.add_argument("--json", action="store_true", help="print one JSON object (files and raw rows)")

    p = sub.add_parser("plot", help="training curves (loss, accuracy, attack success per epoch) of run folders")
    add_config_options(p, PlotConfig)


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from .export import export

    config = config_from_args(ExportConfig, args)
    meta = export(config.checkpoint, config.out, config.which)
    if args.json:
        return meta
    print(f"wrote {config.out}: {meta['model']}, {meta['num_classes']} classes, {meta['method']} at eps "
          f"{meta['eps']:g}" + ("" if meta["norm"] == "linf" else f" ({meta['norm']})"))
    return {}


def _reproduce(args: argparse.Namespace) -> dict[str, Any]:
    from .reproduce import reproduce, summary

    report = reproduce(args.experiment, args.preset, args.out, datasets=args.dataset, device=args.device,
                       data_dir=args.data_dir, download=args.download,
                       log=lambda s: print(s, file=sys.stderr, flush=True), eps=args.eps, norm=args.norm,
                       methods=args.methods, seeds=args.seeds)
    if args.json:
        return report
    print(summary(report))
    return {}


def _plot(args: argparse.Namespace) -> dict[str, Any]:
    from .reproduce import PlotConfig, plot_curves

    config = config_from_args(PlotConfig, args)
    return {"out": plot_curves(config.runs, config.out)}


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if not result:
        return
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if value is None:  # e.g. "which" of an exported file, which has one set of weights
            continue
        if key in ("eps", "pgm_step") and isinstance(value, float):
            print(f"{key}: {pixels(value)}")
        elif isinstance(value, dict):
            for k, v in value.items():
                print(f"{key} {k}: {v:.4f}" if isinstance(v, float) else f"{key} {k}: {v}")
        elif isinstance(value, list):
            for item in value:
                print(f"{key}: {item}")
        else:
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def pixels(value: float) -> str:
    """A radius in pixel units as it is usually written: 8/255 (= 0.0314) where it is a whole
    number of 255ths, else the number."""
    k = round(value * 255)
    if k and math.isclose(value, k / 255, rel_tol=1e-6):
        return f"{k}/255 (= {value:.4f})"
    return f"{value:g}"


def given_options(argv: Sequence[str]) -> set[str]:
    """The destinations of the options given on the command line `argv` (which parses), whatever
    their values: a given option that equals its default counts as given."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in sub.choices.values():
        p._defaults.clear()  # set_defaults
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m learn2defend -- eval ...`, where torchrun leaves the `--`
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
        args.given_options = given_options(argv)
    except SystemExit as e:  # --help, or a malformed option (already printed as one line)
        return e.code if isinstance(e.code, int) else 0
    try:
        from . import distributed

        if distributed.launched() and args.command not in ("train", "eval"):  # see docs/distributed.md
            raise UserError(f"'{args.command}' does not run under torchrun; only train and eval do: "
                            "run it as one process")
        from .models import import_models

        import_models([*args.imports, *args.sub_imports])  # before anything looks a model up
        distributed.init_from_env(getattr(args, "device", "auto"))
        if args.command == "models":
            from .models import list_models

            print("\n".join(list_models(args.pattern)))
            return 0
        commands = {"train": _train, "eval": _eval, "compare": _compare, "demo": _compare, "export": _export,
                    "bench": _bench, "doctor": _doctor, "gpu-report": _gpu_report,
                    "transfer": _transfer, "sweep": _sweep, "show": _show,
                    "reproduce": _reproduce, "plot": _plot}
        result = commands[args.command](args)
    except UserError as e:  # one line, even when the message quotes a file name with a newline
        print(f"learn2defend: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a message (eval's EvalInterrupted) says how to continue
        print(f"learn2defend: {e}" if str(e) else "learn2defend: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only to name TrainingInterrupted without importing train eagerly
        if type(e).__name__ != "TrainingInterrupted":
            raise
        print(f"learn2defend: {e}", file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun, rank 0 alone reports
        _print_result(result, getattr(args, "json", False))
    return 0
