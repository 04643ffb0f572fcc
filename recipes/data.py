"""Datasets for the recipes: an ImageFolder root, ``cifar10`` or ``fashion-mnist``.

``--data`` accepts

* a directory in ImageNet layout: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``;
* ``cifar10``: an ImageFolder copy of the CIFAR-10 images, ``ROOT/train/<class>/`` and, when
  present, ``ROOT/test/<class>/`` (the project's ``cifar10-jpeg-train.tar.gz`` and
  ``cifar10-jpeg-test-a.tar.gz`` extracted into one root, ``~/.cache/daq/cifar10-jpeg`` by
  default). Training always uses the training images minus a split carved from them (the last
  ``val_per_class`` images of each class). Evaluation (``eval_split``): ``"test"`` — the unseen
  test images, the default whenever ``ROOT/test/`` exists; ``"carved"`` — the carved split, for
  tuning only (the shared pretrained ResNet-20 was trained on those images). Or torchvision's
  downloader when ``--download`` is given and the machine is online (official test split);
* ``fashion-mnist``: the IDX files of the Debian/Ubuntu package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or torchvision's downloader with ``--download``.
  The official 10k test split is the validation set. Grey images are repeated to 3 channels.

Small-image datasets (CIFAR-10, Fashion-MNIST) are held in memory as uint8 tensors and
augmented with tensor ops drawing from torch's global RNG (deterministic under the trainer's
per-epoch seeding); ImageFolder roots go through torchvision transforms and DataLoader workers.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FMNIST_MEAN = (0.2860,) * 3
FMNIST_STD = (0.3530,) * 3

DEFAULT_CACHE = Path(os.environ.get("DAQ_CACHE", Path.home() / ".cache" / "daq"))
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what was expected and how to get it."""


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    in_memory: bool
    description: str
    #: which images ``val`` holds: ``"test"`` (unseen test images), ``"carved"`` (a split carved from
    #: the training images: for tuning only) or ``"val"`` (an ImageFolder root's own val/)
    eval_split: str = "val"
    #: the split carved from the training images (for tuning; ``None`` where the dataset has none):
    #: CIFAR-10 ImageFolder copies fill it whatever ``eval_split`` is, so a run can report the
    #: carved-split accuracy it is tuned on beside the test accuracy it is reported on
    tune: Optional[Dataset] = None


# --------------------------------------------------------------------------------------
# In-memory tensor datasets with cheap augmentation
# --------------------------------------------------------------------------------------

class TensorImageDataset(Dataset):
    """uint8 images ``N x C x H x W`` resized once to ``img_size``; normalised on access.

    Training augmentation: random crop with ``img_size // 8`` zero padding and a horizontal
    flip, drawn from torch's global RNG.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int, mean, std, train: bool):
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != img_size or images.shape[-2] != img_size:
            out = []
            for chunk in images.split(4096):
                out.append(F.interpolate(chunk.float(), size=(img_size, img_size), mode="bilinear",
                                         align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8))
            images = torch.cat(out) if out else images
        self.images = images.contiguous()
        self.targets = labels.long().tolist()
        self.labels = labels.long()
        self.img_size = img_size
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(3, 1, 1) * 255.0
        self.train = train
        self.pad = max(1, img_size // 8)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i].float()
        if self.train:
            p = self.pad
            x = F.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, dy:dy + self.img_size, dx:dx + self.img_size]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i].item()


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 8:
        raise DataError(f"{path} is not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path} is not a uint8 IDX file (header {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    count = 1
    for d in dims:
        count *= d
    if len(body) != count:
        raise DataError(f"{path} is truncated: expected {count} bytes of data for shape {dims}, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(img_size: int, data_root: Optional[str] = None, download: bool = False) -> DataBundle:
    roots = [Path(data_root)] if data_root else list(FASHION_MNIST_DIRS) + [DEFAULT_CACHE / "fashion-mnist"]
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for root in roots:
        files = [_find_idx(root, s) for s in stems]
        if all(files):
            xtr, ytr, xva, yva = (_read_idx(f) for f in files)
            if xtr.shape[0] != ytr.shape[0] or xva.shape[0] != yva.shape[0]:
                raise DataError(f"Fashion-MNIST in {root}: image and label counts differ")
            return DataBundle(
                TensorImageDataset(xtr, ytr, img_size, FMNIST_MEAN, FMNIST_STD, train=True),
                TensorImageDataset(xva, yva, img_size, FMNIST_MEAN, FMNIST_STD, train=False),
                10, img_size, True, f"Fashion-MNIST ({root}; eval = official test split)", "test")
    if download:
        import torchvision
        dst = DEFAULT_CACHE / "torchvision"
        try:
            tr = torchvision.datasets.FashionMNIST(str(dst), train=True, download=True)
            va = torchvision.datasets.FashionMNIST(str(dst), train=False, download=True)
        except Exception as e:  # offline
            raise DataError(f"downloading Fashion-MNIST failed ({e}); install it offline-capable with"
                            f" `sudo apt-get install -y dataset-fashion-mnist`") from e
        return DataBundle(TensorImageDataset(tr.data, tr.targets, img_size, FMNIST_MEAN, FMNIST_STD, True),
                          TensorImageDataset(va.data, va.targets, img_size, FMNIST_MEAN, FMNIST_STD, False),
                          10, img_size, True, "Fashion-MNIST (torchvision download)")
    where = ", ".join(str(r) for r in roots)
    raise DataError(
        f"Fashion-MNIST not found (looked in {where} for {stems[0]}.gz and friends). Install the Debian/Ubuntu"
        f" package with `sudo apt-get install -y dataset-fashion-mnist` (files land in /usr/share/datasets/"
        f"fashion-mnist), pass --data-root DIR holding the four IDX files, or add --download when online.")


def _list_image_folder(split_dir: Path):
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist or is not a directory")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class sub-directories: expected ImageFolder layout"
                        f" {split_dir}/<class_name>/<image>.jpg")
    samples = []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(f"class directory {split_dir / c} contains no images ({', '.join(IMG_EXTENSIONS)})")
        samples.extend((p, ci) for p in files)
    return classes, samples


def _decode_all(samples, size_hint: int = 32) -> torch.Tensor:
    from PIL import Image
    import numpy as np
    arrs = []
    for p, _ in samples:
        try:
            with Image.open(p) as im:
                arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as e:
            raise DataError(f"cannot decode image {p}: {e}") from e
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:3]}...; cifar10 expects 32x32 images")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def read_cifar10_archive(path, per_class: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class from ``cifar10-jpeg-train.tar.gz``, without extracting it.

    Returns ``(images, labels)``: uint8 ``N x 3 x 32 x 32`` in archive order and class indices
    (classes sorted by name). For tests and benchmarks that need a few hundred real images.
    """
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: expected the CIFAR-10 JPEG archive (cifar10-jpeg-train.tar.gz)")
    images, names, counts = [], [], {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".jpg")):
                continue
            cls = member.name.split("/")[-2]
            if counts.get(cls, 0) >= per_class:
                if len(counts) == 10 and min(counts.values()) >= per_class:
                    break
                continue
            counts[cls] = counts.get(cls, 0) + 1
            images.append(np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
            names.append(cls)
    classes = sorted(set(names))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([classes.index(c) for c in names]))


#: ``eval_split`` values of :func:`load_cifar10`
EVAL_SPLITS = ("auto", "test", "carved")


def read_image_folder(split_dir, cache: Optional[Path] = None):
    """Decode an ImageFolder split (``split_dir/<class>/*.jpg``) into memory, in ImageFolder order.

    Returns ``(classes, images, labels)``: sorted class names, uint8 ``N x 3 x H x W`` (classes
    sorted, files sorted within a class: torchvision ``ImageFolder``'s order) and class indices.
    ``cache`` (default ``split_dir/../.daq-cache-<split>-v1.pt``) keeps the decoded tensor (best effort).
    """
    split_dir = Path(split_dir)
    if cache is None:
        cache = split_dir.parent / f".daq-cache-{split_dir.name}-v1.pt"
    classes, samples = _list_image_folder(split_dir)
    images = None
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob["n"] == len(samples):
                images = blob["images"]
        except Exception:
            images = None
    if images is None:
        images = _decode_all(samples)
        try:  # best effort: a read-only root just skips the cache
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"n": len(samples), "images": images}, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass
    return classes, images, torch.tensor([c for _, c in samples])


def _extract_hint(root: Path) -> str:
    return (f"`mkdir -p {root} && tar xzf cifar10-jpeg-train.tar.gz -C {root} && tar xzf"
            f" cifar10-jpeg-test-a.tar.gz -C {root}`")


def load_cifar10(img_size: int, data_root: Optional[str] = None, download: bool = False,
                 val_per_class: int = 500, eval_split: str = "auto") -> DataBundle:
    """CIFAR-10 train/eval datasets; ``eval_split`` picks the evaluation images (see the module doc)."""
    if eval_split not in EVAL_SPLITS:
        raise DataError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
    root = Path(data_root) if data_root else DEFAULT_CACHE / "cifar10-jpeg"
    if (root / "train").is_dir():
        classes, images, labels = read_image_folder(root / "train", root / ".daq-cache-v1.pt")
        if len(classes) != 10:
            raise DataError(f"{root / 'train'} has {len(classes)} classes; CIFAR-10 has 10")
        val_mask = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            idx = (labels == c).nonzero().flatten()
            if len(idx) <= val_per_class:
                raise DataError(f"class {classes[c]} has only {len(idx)} images; cannot carve {val_per_class}"
                                f" validation images from it")
            val_mask[idx[-val_per_class:]] = True
        train = TensorImageDataset(images[~val_mask], labels[~val_mask], img_size, CIFAR_MEAN, CIFAR_STD, True)
        carved = TensorImageDataset(images[val_mask], labels[val_mask], img_size, CIFAR_MEAN, CIFAR_STD, False)
        use_test = eval_split == "test" or (eval_split == "auto" and (root / "test").is_dir())
        if not use_test:
            return DataBundle(
                train, carved, 10, img_size, True,
                f"CIFAR-10 ImageFolder {root}/train; eval = carved split (last {val_per_class} training images"
                f" of each class: for tuning; the shared pretrained ResNet-20 saw them)", "carved", carved)
        if not (root / "test").is_dir():
            raise DataError(f"eval_split='test' but {root}/test does not exist: extract the CIFAR-10 test images"
                            f" beside train/, e.g. {_extract_hint(root)}")
        test_classes, test_images, test_labels = read_image_folder(root / "test", root / ".daq-cache-test-v1.pt")
        if test_classes != classes:
            raise DataError(f"{root}/test and {root}/train have different class folders ({test_classes} vs {classes})")
        return DataBundle(
            train, TensorImageDataset(test_images, test_labels, img_size, CIFAR_MEAN, CIFAR_STD, False),
            10, img_size, True,
            f"CIFAR-10 ImageFolder {root}/train (minus the last {val_per_class} images of each class, kept for"
            f" tuning); eval = {root}/test ({len(test_labels)} unseen test images)", "test", carved)
    if download:
        import torchvision
        dst = DEFAULT_CACHE / "torchvision"
        try:
            tr = torchvision.datasets.CIFAR10(str(dst), train=True, download=True)
            va = torchvision.datasets.CIFAR10(str(dst), train=False, download=True)
        except Exception as e:
            raise DataError(f"downloading CIFAR-10 failed ({e}); pass --data-root with an ImageFolder copy") from e
        to_t = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return DataBundle(TensorImageDataset(to_t(tr), torch.tensor(tr.targets), img_size, CIFAR_MEAN, CIFAR_STD, True),
                          TensorImageDataset(to_t(va), torch.tensor(va.targets), img_size, CIFAR_MEAN, CIFAR_STD, False),
                          10, img_size, True, "CIFAR-10 (torchvision download; eval = official test split)", "test")
    raise DataError(
        f"CIFAR-10 not found: expected an ImageFolder copy at {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
        f" (extract the two archives there: {_extract_hint(root)}),"
        f" pass --data-root DIR, or add --download when online.")


def load_image_folder(root: str, img_size: int) -> DataBundle:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    r = Path(root)
    if not r.exists():
        raise DataError(f"data directory {r} does not exist; pass an ImageFolder root containing train/ and val/,"
                        f" or a named dataset: cifar10, fashion-mnist")
    if not r.is_dir():
        raise DataError(f"--data {r} is a file, not a directory; pass an ImageFolder root containing train/ and val/")
    for split in ("train", "val"):
        if not (r / split).is_dir():
            raise DataError(f"data directory {r} has no {split}/ sub-directory: expected ImageNet layout"
                            f" {r}/train/<class>/*.jpg and {r}/val/<class>/*.jpg")
    tr_classes, _ = _list_image_folder(r / "train")
    va_classes, _ = _list_image_folder(r / "val")
    if tr_classes != va_classes:
        raise DataError(f"{r}/train and {r}/val have different class folders ({len(tr_classes)} vs"
                        f" {len(va_classes)}; first difference: "
                        f"{next((a, b) for a, b in zip(tr_classes + [''], va_classes + ['']) if a != b)})")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    resize = int(round(img_size / 0.875))
    train_tf = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(img_size), T.ToTensor(), norm])
    tr = ImageFolder(str(r / "train"), transform=train_tf)
    va = ImageFolder(str(r / "val"), transform=val_tf)
    return DataBundle(tr, va, len(tr_classes), img_size, False, f"ImageFolder {r}")


def build_data(name: str, img_size: int, data_root: Optional[str] = None, download: bool = False,
               val_per_class: int = 500, eval_split: str = "auto") -> DataBundle:
    """Resolve ``--data`` (a named dataset or an ImageFolder root) into train/eval datasets.

    ``eval_split`` applies to ``cifar10`` (``auto``/``test``/``carved``, see :func:`load_cifar10`).
    """
    key = name.lower().replace("_", "-")
    if key in ("cifar10", "cifar-10"):
        return load_cifar10(img_size, data_root, download, val_per_class, eval_split)
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        return load_fashion_mnist(img_size, data_root, download)
    return load_image_folder(name, img_size)


def subset(ds: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """A class-balanced deterministic subset of ``n`` samples (the whole set when ``n`` is None)."""
    if n is None or n >= len(ds):
        return ds
    targets = torch.as_tensor(getattr(ds, "targets"))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=g)
    classes = targets.unique()
    per = [perm[targets[perm] == c] for c in classes]
    order = torch.stack([p[:min(len(q) for q in per)] for p in per], 1).flatten()  # round-robin over classes
    idx = order[:n]
    if len(idx) < n:
        rest = perm[~torch.isin(perm, idx)]
        idx = torch.cat([idx, rest[:n - len(idx)]])
    idx = idx.sort().values.tolist()
    if isinstance(ds, TensorImageDataset):
        out = TensorImageDataset.__new__(TensorImageDataset)
        out.__dict__.update(ds.__dict__)
        out.images = ds.images[idx]
        out.labels = ds.labels[idx]
        out.targets = out.labels.tolist()
        return out
    sub = torch.utils.data.Subset(ds, idx)
    sub.targets = [int(targets[i]) for i in idx]
    return sub
