"""Model registration, checkpoint loading and data helpers."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile

import pytest
import torch

from recipes import data as data_mod
from recipes import models as models_mod


def test_resnet20_cifar_is_a_timm_model():
    import timm
    model = timm.create_model("resnet20_cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 269722  # 0.27M, option-A shortcuts (as the shared checkpoint)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(models_mod.ModelError, match="--initial-checkpoint"):
        timm.create_model("resnet20_cifar", pretrained=True)


def test_unfuse_batchnorm_act_keeps_the_function():
    import timm
    model = timm.create_model("mobilenetv2_050", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    models_mod.unfuse_batchnorm_act(model)
    from timm.layers import BatchNormAct2d
    assert not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref)


def _idx(tensor: torch.Tensor) -> bytes:
    dims = tensor.shape
    return struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(">" + "I" * len(dims), *dims) + tensor.numpy().tobytes()


def test_fashion_mnist_idx_reader(tmp_path):
    imgs = torch.randint(0, 255, (20, 28, 28), dtype=torch.uint8)
    labels = torch.arange(20, dtype=torch.uint8) % 10
    for split, n in (("train", 20), ("t10k", 10)):
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs[:n])))
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:n])))
    bundle = data_mod.build_data("fashion-mnist", 16, str(tmp_path))
    x, y = bundle.val[3]
    assert x.shape == (3, 16, 16) and y == 3 and len(bundle.train) == 20
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:10])[:-3]))
    with pytest.raises(data_mod.DataError, match="truncated"):
        data_mod.build_data("fashion-mnist", 16, str(tmp_path))


def test_subset_is_class_balanced_and_deterministic():
    ds = data_mod.TensorImageDataset(torch.zeros(100, 3, 8, 8, dtype=torch.uint8), torch.arange(100) % 4, 8,
                                     (0.5,) * 3, (0.5,) * 3, train=False)
    a, b = data_mod.subset(ds, 20, seed=1), data_mod.subset(ds, 20, seed=1)
    assert a.targets == b.targets and sorted(a.targets) == sorted([0, 1, 2, 3] * 5)


def test_shared_resnet20_checkpoint_loads_and_classifies(shared_data):
    """The project's pretrained CIFAR-10 ResNet-20 ('module.' keys) through --initial-checkpoint."""
    model = models_mod.create_model("resnet20_cifar", 10,
                                    initial_checkpoint=str(shared_data / "resnet20-cifar10-12fca82f.th")).eval()
    from PIL import Image
    import numpy as np
    classes, xs, ys = {}, [], []
    with tarfile.open(shared_data / "cifar10-jpeg-train.tar.gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            cls = member.name.split("/")[-2]
            classes.setdefault(cls, 0)
            if classes[cls] < 30:
                classes[cls] += 1
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
                ys.append(cls)
    names = sorted(classes)
    assert len(names) == 10
    mean = torch.tensor(data_mod.CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(data_mod.CIFAR_STD).view(3, 1, 1)
    x = (torch.stack(xs) - mean) / std
    y = torch.tensor([names.index(c) for c in ys])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8, acc  # training images of a 91.8% model, JPEG-compressed


def _cifar_like_root(root, train_per_class=6, test_per_class=2):
    """An ImageFolder copy laid out like the extracted archives: ROOT/train/<class>/, ROOT/test/<class>/."""
    from PIL import Image
    import numpy as np

    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # pixel value encodes (split, class, index): every image is distinct and traceable
                v = (0 if split == "train" else 128) + 10 * c + i
                Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def _values(ds):
    return sorted(int(ds.images[i, 0, 0, 0]) for i in range(len(ds)))


def test_cifar10_eval_splits_and_the_carved_tuning_split(tmp_path):
    root = _cifar_like_root(tmp_path / "c10")
    test = data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="test")
    auto = data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="auto")
    carved = data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="carved")
    assert test.eval_split == auto.eval_split == "test" and carved.eval_split == "carved"
    # test: the ROOT/test images; carved: the last 2 training images of each class, never trained on
    assert _values(test.val) == sorted(128 + 10 * c + i for c in range(10) for i in range(2))
    carved_values = sorted(10 * c + i for c in range(10) for i in (4, 5))
    assert _values(carved.val) == carved_values
    # the tuning split is the carved one whatever the eval split, and disjoint from training
    for bundle in (test, carved):
        assert _values(bundle.tune) == carved_values
        assert not set(_values(bundle.train)) & set(carved_values)
        assert len(bundle.train) == 40
    assert "unseen test images" in test.description and "carved" in carved.description


def test_cifar10_test_split_requested_but_absent_says_how_to_extract(tmp_path):
    root = _cifar_like_root(tmp_path / "c10")
    import shutil
    shutil.rmtree(root / "test")
    assert data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="auto").eval_split == "carved"
    with pytest.raises(data_mod.DataError, match="test does not exist: extract"):
        data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="test")
    with pytest.raises(data_mod.DataError, match="eval_split must be one of"):
        data_mod.load_cifar10(8, str(root), val_per_class=2, eval_split="val")
