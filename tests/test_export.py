"""learn2defend export: a weights-only file that learn2defend.load and plain safetensors read back."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from learn2defend import TrainConfig, load, train
from learn2defend.cli import main
from learn2defend.errors import UserError
from learn2defend.models import create_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return train(TrainConfig(out=str(tmp / "run"), dataset="fake:3x16x16:4", method="grad-l2l", epochs=1,
                             batch_size=64, val_robust_n=0, progress=False, attacker_width=0.125,
                             data_dir=str(tmp / "data")))


def test_export_holds_exactly_the_classifier(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run.path), "--out", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    reference = load(run.path).state_dict()
    weights = load_file(str(out))
    assert weights.keys() == reference.keys()  # no prefixes, no optimizer, no attacker
    for k in reference:
        assert torch.equal(weights[k], reference[k]), k
    with safe_open(str(out), framework="pt") as f:
        stored = f.metadata()
    assert stored["model"] == "smallcnn" and json.loads(stored["num_classes"]) == 4
    assert json.loads(stored["image_shape"]) == [3, 16, 16] and json.loads(stored["classes"]) == ["0", "1", "2", "3"]
    assert json.loads(stored["eps"]) == pytest.approx(0.03) and stored["method"] == "grad-l2l"
    assert len(json.loads(stored["mean"])) == 3 and len(json.loads(stored["std"])) == 3
    assert "learn2defend_version" in stored and meta["model"] == "smallcnn"
    assert out.stat().st_size < (run.path / "last.safetensors").stat().st_size / 2


def test_exported_file_loads_and_computes_the_same(run, tmp_path):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run.path), "--out", str(out), "--which", "best"]) == 0
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load(out)(x), load(run.path, "best")(x))
        # plain PyTorch: the registry's network and the file's weights
        plain = create_model("smallcnn", num_classes=4, in_channels=3, image_size=16).eval()
        plain.load_state_dict(load_file(str(out)))
        assert torch.equal(plain(x), load(run.path, "best")(x))


def test_export_and_load_refuse_bad_input(run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert main(["export", str(run.path), "--out", str(tmp_path / "no" / "m.safetensors")]) == 2
    assert main(["export", str(run.path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(UserError, match="not a model exported"):
        load(run.path / "last.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load(junk)
