"""Bad input gets a clear message (exit code 2), never a traceback or a half-written output."""

from __future__ import annotations

import pytest
import torch

from recipes import resnet20_cifar10
from recipes.train import CHECKPOINT_NAME

from recipe_helpers import base_args, make_image_folder


def run(capsys, args):
    rc = resnet20_cifar10.main(args)
    return rc, capsys.readouterr().err


def test_missing_data_dir(capsys, tmp_path):
    rc, err = run(capsys, base_args(tmp_path / "nope", tmp_path / "out"))
    assert rc == 2 and "does not exist" in err and "train/ and val/" in err


def test_data_dir_without_val_split(capsys, tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    rc, err = run(capsys, base_args(tmp_path / "d", tmp_path / "out"))
    assert rc == 2 and "no val/ sub-directory" in err


def test_empty_class_dir(capsys, tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1, size=8)
    (data / "train" / "class9").mkdir()
    (data / "val" / "class9").mkdir()
    rc, err = run(capsys, base_args(data, tmp_path / "out"))
    assert rc == 2 and "contains no images" in err


def test_named_dataset_missing_says_how_to_get_it(capsys, tmp_path):
    args = base_args("fashion-mnist", tmp_path / "out") + ["--data-root", str(tmp_path / "none")]
    rc, err = run(capsys, args)
    assert rc == 2 and "apt-get install -y dataset-fashion-mnist" in err
    rc, err = run(capsys, base_args("cifar10", tmp_path / "out") + ["--data-root", str(tmp_path / "none")])
    assert rc == 2 and "CIFAR-10 not found" in err


def test_unknown_model_name(capsys, tiny_data, tmp_path):
    args = base_args(tiny_data, tmp_path / "out") + ["--model", "mobilenetv2_101"]
    rc, err = run(capsys, args)
    assert rc == 2 and "unknown model name 'mobilenetv2_101'" in err and "mobilenetv2_100" in err


def test_initial_checkpoint_from_another_model(capsys, tiny_data, tmp_path):
    import timm
    other = tmp_path / "other.pth"
    torch.save({"state_dict": timm.create_model("resnet10t", num_classes=4).state_dict()}, other)
    rc, err = run(capsys, base_args(tiny_data, tmp_path / "out") + ["--initial-checkpoint", str(other)])
    assert rc == 2 and "does not fit model resnet20_cifar" in err and "missing keys" in err


def test_resume_checkpoint_with_other_bit_width(capsys, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    meta = {"recipe": "resnet20_cifar10", "model": "resnet20_cifar", "framework": "fx", "weight_bits": 2,
            "act_bits": 2, "num_classes": 4, "img_size": 16, "float_layers": ["conv1", "linear"], "version": 1}
    torch.save({"daq_recipe": meta, "stage": "qat", "epoch": 1}, out / CHECKPOINT_NAME)
    rc, err = run(capsys, base_args(tiny_data, out) + ["--bits", "W4A4", "--resume"])
    assert rc == 2 and "weight_bits=2" in err and "weight_bits=4" in err
    meta["model"], meta["weight_bits"] = "mobilenetv2_100", 4
    torch.save({"daq_recipe": meta, "stage": "qat", "epoch": 1}, out / CHECKPOINT_NAME)
    rc, err = run(capsys, base_args(tiny_data, out) + ["--resume"])
    assert rc == 2 and "model='mobilenetv2_100'" in err


def test_resume_without_or_with_corrupt_checkpoint(capsys, tiny_data, tmp_path):
    out = tmp_path / "out"
    rc, err = run(capsys, base_args(tiny_data, out) + ["--resume"])
    assert rc == 2 and "no checkpoint" in err
    (out / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 truncated")
    rc, err = run(capsys, base_args(tiny_data, out) + ["--resume"])
    assert rc == 2 and "cannot read" in err


def test_unwritable_output_dir(capsys, tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, err = run(capsys, base_args(tiny_data, blocker / "out"))
    assert rc == 2 and "is not writable" in err


def test_bad_bits_argument(capsys, tiny_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        resnet20_cifar10.main(base_args(tiny_data, tmp_path / "out") + ["--bits", "W4"])
    assert e.value.code == 2 and "WxAy" in capsys.readouterr().err


def test_tune_eval_needs_a_carved_split(capsys, tiny_data, tmp_path):
    # an ImageFolder root with its own val/ has no split carved from the training images
    rc, err = run(capsys, base_args(tiny_data, tmp_path / "out") + ["--tune-eval"])
    assert rc != 0 and "--tune-eval" in err and "carved" in err
