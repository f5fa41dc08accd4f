"""--model timm:NAME: timm's test_* models (tiny, no weights to download) through the registry,
train, eval, export, transfer and --init in a fresh process; --pretrained from local files; bad
names and images too small, each one line and exit 2 with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import learn2defend
from learn2defend.cli import main
from learn2defend.config import TrainConfig
from learn2defend.errors import UserError
from learn2defend.models import create_model, list_models

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(learn2defend.__file__).resolve().parents[1])
DATA = "fake:3x32x32:10"


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), dataset=DATA, model="timm:test_resnet", method="fgsm", random_start=True,
                epochs=1, batch_size=16, train_size=32, val_size=16, val_robust_n=4, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_listed_with_a_timm_pattern(capsys):
    names = list_models("timm:test_*")
    assert "timm:test_resnet" in names and "timm:test_vit" in names
    assert all(n.startswith("timm:test_") for n in names)
    assert not any(n.startswith("timm:") for n in list_models())  # the built-in list as before
    assert main(["models", "timm:*resnet*"]) == 0
    shown = capsys.readouterr().out.split()
    assert "timm:test_resnet" in shown and "timm:resnet50" in shown and "smallcnn" not in shown


def test_normalization_inside_and_img_size_only_where_taken():
    vit = create_model("timm:test_vit", num_classes=7, in_channels=1, image_size=32, mean=[0.2], std=[0.4])
    assert vit(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert vit.normalize.mean.flatten().tolist() == pytest.approx([0.2])
    assert vit.net.patch_embed.img_size == (32, 32)  # the ViT was built for these images
    cnn = create_model("timm:test_efficientnet", num_classes=3, image_size=(24, 40))  # takes no img_size
    assert cnn(torch.rand(1, 3, 24, 40)).shape == (1, 3)


def test_unknown_timm_name_suggests_close_ones_and_writes_nothing(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--dataset", DATA, "--model", "timm:test_resnt", "--epochs", "1",
                                  "--device", "cpu", "--out", str(tmp_path / "r")])
    assert "unknown timm model 'test_resnt'" in err and "timm:test_resnet" in err
    assert not (tmp_path / "r").exists()


def test_model_too_large_for_the_images_says_so_in_one_line(tmp_path, capsys):
    # test_vit's 16-pixel patches do not fit 8x8 images
    err = one_line_error(capsys, ["train", "--dataset", "fake:3x8x8:4", "--model", "timm:test_vit", "--epochs",
                                  "1", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert "--model timm:test_vit cannot take 3x8x8 images" in err and "patch size" in err
    assert not (tmp_path / "r").exists()
    # test_convnext's stem and downsampling pool 8x8 images down to nothing
    with pytest.raises(UserError, match="cannot take 3x8x8"):
        create_model("timm:test_convnext", num_classes=4, image_size=8)


def test_pretrained_only_for_timm_models(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--dataset", DATA, "--model", "smallcnn", "--pretrained", "w.pth",
                                  "--out", str(tmp_path / "r")])
    assert "timm: models only" in err
    missing = str(tmp_path / "missing.safetensors")
    err = one_line_error(capsys, ["train", "--dataset", DATA, "--model", "timm:test_resnet", "--pretrained", missing,
                                  "--device", "cpu", "--out", str(tmp_path / "r")])
    assert "no such file" in err
    assert not (tmp_path / "r").exists()


def _weights(name: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model(name, num_classes=num_classes).state_dict().items()}


def test_pretrained_safetensors_and_torch_files(tmp_path):
    """Body weights from the file; a head for another number of classes re-initialized, one that fits
    kept; the normalization is the weights' pretrained_cfg (ImageNet's for test_efficientnet)."""
    same, other = _weights("test_efficientnet", 10, seed=1), _weights("test_efficientnet", 5, seed=2)
    save_file(same, str(tmp_path / "same.safetensors"))
    save_file(other, str(tmp_path / "other.safetensors"))
    torch.save({"state_dict": other}, tmp_path / "other.pth")  # a timm training checkpoint's layout

    def build(path: Path) -> torch.nn.Module:
        return create_model("timm:test_efficientnet", num_classes=10, image_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                            pretrained=str(path))

    kept_model = build(tmp_path / "same.safetensors")
    assert "state_dict" not in kept_model.net.pretrained_cfg  # the file's tensors are not kept twice
    kept = kept_model.net.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in same.items())
    for path in (tmp_path / "other.safetensors", tmp_path / "other.pth"):
        model = build(path)
        got = model.net.state_dict()
        assert torch.equal(got["conv_stem.weight"], other["conv_stem.weight"])
        assert got["classifier.weight"].shape == (10, other["classifier.weight"].shape[1])  # a fresh 10-class head
        assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    # a pickle that is not plain weights is refused, not run
    torch.save({"state_dict": other, "extra": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="cannot read weights"):
        build(tmp_path / "pickled.pth")
    # weights of another architecture do not fit, with a head that fits or not
    save_file(_weights("test_resnet", 10, seed=0), str(tmp_path / "resnet.safetensors"))
    with pytest.raises(UserError, match="could not load the pretrained weights.*size mismatch for bn1"):
        build(tmp_path / "resnet.safetensors")
    save_file(_weights("test_vit", 5, seed=0), str(tmp_path / "vit.safetensors"))  # no name in common
    with pytest.raises(UserError, match="holds no weights for"):
        build(tmp_path / "vit.safetensors")


FRESH = r"""
import json, sys, torch
import learn2defend
from learn2defend.cli import main
run, out = sys.argv[1], sys.argv[2]
x = torch.load(out + "/x.pt")
codes = [main(["eval", "--checkpoint", run, "--n-images", "8", "--attacks", "fgsm", "--device", "cpu", "--json"]),
         main(["export", run, "--out", out + "/m.safetensors"]),
         main(["transfer", "--surrogate", run, "--target", run, "--n-images", "8", "--device", "cpu", "--json"]),
         main(["train", "--init", run, "--dataset", "fake:3x32x32:10", "--model", "timm:test_vit", "--method", "plain",
               "--epochs", "1", "--batch-size", "16", "--train-size", "16", "--val-size", "16", "--val-robust-n", "0",
               "--device", "cpu", "--no-progress", "--out", out + "/init"])]
logits = [learn2defend.load(p)(x).tolist() for p in (run, out + "/m.safetensors")]
print(json.dumps({"codes": codes, "logits": logits}))
"""


def test_trained_timm_model_rebuilt_in_a_fresh_process(tmp_path):
    """Train test_vit in-process (1 epoch, FGSM-RS), then eval, export, transfer and --init in a new
    interpreter: every command rebuilds timm's model from the run folder or the exported file."""
    run = learn2defend.train(tiny(tmp_path / "run", model="timm:test_vit"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "timm:test_vit" and config["pretrained"] is None
    x = torch.rand(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected = run.model(x)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "run"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0]
    for logits in result["logits"]:
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=1e-5, atol=1e-5)
    from learn2defend.checkpoint import load_state
    from learn2defend.export import read_metadata

    assert read_metadata(tmp_path / "m.safetensors")["made_with"]["timm"] == timm.__version__
    assert load_state(tmp_path / "run" / "last.safetensors")["made_with"]["timm"] == timm.__version__
    assert (tmp_path / "init" / "last.safetensors").is_file()


def test_train_from_pretrained_file_records_it(tmp_path):
    """--pretrained through train: stored in config.json; the run's normalization (and the export's
    metadata) is the weights' own; resuming does not read the file again."""
    save_file(_weights("test_efficientnet", 1000, seed=3), str(tmp_path / "w.safetensors"))
    argv = ["train", "--dataset", DATA, "--model", "timm:test_efficientnet", "--pretrained",
            str(tmp_path / "w.safetensors"), "--method", "plain", "--epochs", "1", "--batch-size", "16",
            "--train-size", "16", "--val-size", "16", "--val-robust-n", "0", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["pretrained"] == str(tmp_path / "w.safetensors")
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "m.safetensors")]) == 0
    from learn2defend.export import read_metadata

    assert read_metadata(tmp_path / "m.safetensors")["mean"] == pytest.approx([0.485, 0.456, 0.406])
    (tmp_path / "w.safetensors").unlink()
    assert main([*argv[:-2], "--epochs", "2", "--out", str(tmp_path / "r"), "--resume"]) == 0
