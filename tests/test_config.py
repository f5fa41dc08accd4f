"""The resolved configuration (learn2defend.settings.ResolvedConfig): every default filled in,
grouped, frozen, the only configuration type the loop, the steps, speed and bench take, and
stored in config.json under TrainConfig's flat names so that every version's folders load."""

import dataclasses
import importlib
import json
import typing

import pytest
import torch

from learn2defend import bench, methods, speed
from learn2defend.config import ATTACKER_ADAM_LR, TrainConfig
from learn2defend.methods import METHOD_RECORDS
from learn2defend.settings import ResolvedConfig

# Fields a resolved run may leave at None: each says "the run does without", none "later".
DOES_WITHOUT = {"init", "ema", "attacker", "image_size", "train_size", "flip", "crop_padding", "pgd_steps", "step_size",
                "random_start", "beta", "noise", "workers", "pretrained", "start_every", "js_weight",
                "pgi_lambda", "pgi_decay", "pgi_reset",
                # the device's defaults (speed.DEVICE_DEFAULTS): train fixes them once it knows the
                # device, and config.json records the values that ran
                "channels_last", "compile", "tf32", "cudnn_benchmark"}
# workers: None is the CPUs of the machine that runs

OPTION_SETS = [
    {},
    {"eps": 0.1, "clean_weight": 0.5, "label_smoothing": 0.1, "ema": 0.99, "lr_milestones": [2, 4]},
    {"optimizer": "adam", "attacker_optimizer": "sgd", "attacker_width": 0.5, "amp": "bf16", "flip": False},
]


def _configs():
    for method in METHOD_RECORDS:
        for options in OPTION_SETS:
            if method in ("trades", "mart"):
                options = {k: v for k, v in options.items() if k != "clean_weight"}
            if not METHOD_RECORDS[method].has_attacker:
                options = {k: v for k, v in options.items() if not k.startswith("attacker")}
            yield method, TrainConfig(method=method, dataset="svhn", **options)


def _none_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _none_fields(value, f"{prefix}{f.name}.")
        elif value is None:
            yield f.name


@pytest.mark.parametrize("method, config", list(_configs()))
def test_resolving_fills_every_default_and_round_trips_through_the_flat_form(method, config):
    r = config.resolve()
    assert (r.attacker is None) == (not METHOD_RECORDS[method].has_attacker)
    assert set(_none_fields(r)) <= DOES_WITHOUT
    for name in METHOD_RECORDS[method].defaults:  # the method's own defaults are all there
        assert name in {"attacker"} or dict(_flat(r))[name] is not None
    d = r.to_dict()
    assert set(d) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig.from_dict(json.loads(json.dumps(d))).resolve() == r
    assert r.eps == (config.eps if config.eps is not None else 0.05)  # SVHN's default radius


def _flat(r: ResolvedConfig):
    return r.to_dict().items()


def test_the_groups_hold_what_the_flags_say():
    r = TrainConfig(method="grad-l2l", lr=0.2, lr_milestones=[3], attacker_optimizer="sgd", attacker_every=2,
                    amp="bf16", seed=7, train_size=100).resolve()
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.milestones) == ("sgd", 0.2, (3,))
    assert (r.attacker.name, r.attacker.every, r.attacker.optimizer.lr, r.attacker.optimizer.milestones) == (
        "slim", 2, 0.2, (3,))  # --attacker-optimizer sgd: the classifier's rate and schedule
    assert (r.speed.amp, r.run.seed, r.data.train_size, r.data.dataset) == ("bf16", 7, 100, "digits")
    adam = TrainConfig(method="fgsm-sdi").resolve().attacker
    assert (adam.name, adam.every, adam.optimizer.name, adam.optimizer.lr) == ("sdi", 5, "adam", ATTACKER_ADAM_LR)


def test_a_resolved_config_is_frozen_and_checked():
    r = TrainConfig(method="pgd-at").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.eps = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.attack.pgd_steps = 3  # type: ignore[misc]
    from learn2defend.errors import UserError

    with pytest.raises(UserError, match="--beta applies to"):
        TrainConfig(method="pgd-at", beta=3.0).resolve()  # resolving validates first


def test_an_older_flat_config_json_loads_into_the_same_resolved_config(tmp_path):
    """config.json as earlier versions wrote it: every flat field, an attacker named for a method
    without one, the optimizers' schedules as lists, and no field added since (here --ema, --noise,
    --tf32: tf32 then off)."""
    old = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    old.update(method="pgd", eps=0.2, clean_weight=0.5, pgd_steps=10, step_size=0.2 / 3, attacker="slim",
               attacker_width=0.25, betas=[0.9, 0.99], lr_milestones=[])
    for added in ("ema", "noise", "tf32", "label_smoothing", "attacker_every"):
        del old[added]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    r = TrainConfig.load(path).resolve()
    assert r == TrainConfig(method="pgd", eps=0.2, tf32=False).resolve()
    assert r.attacker is None and r.speed.tf32 is False
    stored = r.to_dict()
    assert "attacker" not in stored and "beta" not in stored  # what pgd does without is not stored
    assert stored["step_size"] == pytest.approx(0.2 / 3) and stored["pgd_steps"] == 10


def test_settings_a_method_does_without_are_none_and_not_stored():
    """pgd-at always starts at a random point and grad-l2l runs no PGD: their configs say neither
    --random-start false nor --pgd-steps 10 (both flags are still accepted, and ignored)."""
    pgd_at = TrainConfig(method="pgd-at").resolve()
    assert (pgd_at.attack.random_start, pgd_at.attack.pgd_steps) == (None, 10)
    grad = TrainConfig(method="grad-l2l", pgd_steps=3).resolve()
    assert (grad.attack.pgd_steps, grad.attack.step_size, grad.attack.random_start) == (None, None, None)
    assert not {"pgd_steps", "step_size", "random_start"} & set(grad.to_dict())
    fgsm_rs = TrainConfig(method="fgsm", random_start=True).resolve()
    assert fgsm_rs.attack.random_start is True and fgsm_rs.to_dict()["random_start"] is True


def test_a_config_json_with_a_bad_value_is_named_in_the_error(tmp_path):
    from learn2defend.config import load_resolved
    from learn2defend.errors import UserError

    d = TrainConfig(method="pgd-at").resolve().to_dict()
    path = tmp_path / "config.json"
    for key, bad, message in [("eps", 8, "--eps must"), ("epochs", "ten", "'epochs' should be int")]:
        path.write_text(json.dumps({**d, key: bad}))
        with pytest.raises(UserError, match=f"run config {path}: .*{message}"):
            load_resolved(path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "model"}))  # every version stored it
    with pytest.raises(UserError, match="names no model; the file is damaged"):
        load_resolved(path)


def test_train_takes_a_derived_resolved_config_and_checks_it_again(tmp_path):
    from learn2defend import train
    from learn2defend.errors import UserError

    base = TrainConfig(method="fgsm-sdi", dataset="digits", epochs=1, train_size=128, batch_size=64,
                       attacker_width=0.25, val_robust_n=0, progress=False, out=str(tmp_path / "a")).resolve()
    with pytest.raises(UserError, match="--eps must"):
        train(dataclasses.replace(base, eps=5.0))
    with pytest.raises(UserError, match="--attacker-every applies to"):  # pgd-at has no attacker to update
        train(dataclasses.replace(base, method="pgd-at"))
    assert not (tmp_path / "a").exists()  # nothing written before the checks
    variant = dataclasses.replace(base, attacker=dataclasses.replace(base.attacker, every=2))
    run = train(variant)
    # the speed switches left to the device are fixed by train, the rest is as given
    assert run.config == dataclasses.replace(variant, speed=run.config.speed) and run.config.attacker.every == 2
    assert None not in dataclasses.astuple(run.config.speed)
    from learn2defend import __version__
    from learn2defend.checkpoint import load_state

    made_with = load_state(run.path / "last.safetensors")["made_with"]  # the device used, not "auto"
    assert made_with == {"learn2defend": __version__, "torch": torch.__version__, "device": "cpu"}


def test_the_loop_the_steps_speed_and_bench_take_the_resolved_config():
    """A TrainConfig (flat, defaults unresolved) has no place in these signatures."""
    train = importlib.import_module("learn2defend.train")  # the package's `train` is the function
    takers = [(train.build_parts, "cfg"), (train.Parts.step, "cfg"), (train._train, "cfg"),
              (train._Loop.__init__, "cfg"), (train.validate, "config"),
              (speed.wrap_step, "cfg"), (speed.check_switches, "cfg"), (speed.prepare_modules, "cfg"),
              (bench.step_macs, "config"), (bench.step_forwards, "config"), (bench.step_macs_per_image, "config")]
    for fn, arg in takers:
        hint = typing.get_type_hints(fn)[arg]
        assert hint in (ResolvedConfig, speed.SpeedSettings), (fn.__qualname__, hint)
    assert typing.get_type_hints(methods.StepContext)["config"] is ResolvedConfig


def test_load_run_on_an_exported_file_says_how_to_load_one(tmp_path):
    from learn2defend import load_run
    from learn2defend.errors import UserError

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match="is a file, not a run folder; an exported model file loads with"):
        load_run(tmp_path / "model.safetensors")
