"""Bundled image-like data sets that work offline: Fashion-MNIST, scikit-learn digits, MNIST-1D.

Each is registered in `DATASETS` and built as `DATASETS.build(name, split="train"|"test", ...)`.
Fashion-MNIST reads the Debian package `dataset-fashion-mnist` (or a directory you name, or the
canonical download with `download=True` where a network exists).
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from still.data.base import TensorDataset
from still.registry import register_dataset

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, dims, then big-endian uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} bytes (truncated file?)")
    return arr.reshape(dims)


def _find_fashion_mnist(root: str | None, download: bool) -> Path:
    candidates = [Path(root)] if root else []
    if os.environ.get("STILL_FASHION_MNIST"):
        candidates.append(Path(os.environ["STILL_FASHION_MNIST"]))
    candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for c in candidates:
        if (c / FASHION_MNIST_FILES["test"][0]).exists():
            return c
    if download:
        dest = Path(root or Path.home() / ".cache/still/fashion-mnist")
        dest.mkdir(parents=True, exist_ok=True)
        for files in FASHION_MNIST_FILES.values():
            for f in files:
                if not (dest / f).exists():
                    tmp = dest / (f + ".part")
                    urllib.request.urlretrieve(FASHION_MNIST_URL + f, tmp)
                    os.replace(tmp, dest / f)
        return dest
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
        "*-ubyte.gz files in a directory and pass `root: DIR` (or set STILL_FASHION_MNIST), or pass "
        "`download: true` where a network is available."
    )


@register_dataset("fashion_mnist", paper="Xiao, Rasul, Vollgraf. Fashion-MNIST (2017)")
def fashion_mnist(split: str = "train", root: str | None = None, subset: int | None = None,
                  subset_seed: int = 0, normalize: bool = True, download: bool = False) -> TensorDataset:
    """Fashion-MNIST, 60k train / 10k test, x (1, 28, 28) float32 normalised, 10 classes."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    d = _find_fashion_mnist(root, download)
    img_f, lab_f = FASHION_MNIST_FILES[split]
    x = torch.from_numpy(read_idx(d / img_f).copy()).float().div_(255.0).unsqueeze(1)
    if normalize:
        x = (x - _FMNIST_MEAN) / _FMNIST_STD
    y = torch.from_numpy(read_idx(d / lab_f).astype(np.int64))
    ds = TensorDataset(x, y, 10, "fashion_mnist", {"split": split, "normalize": normalize})
    ds.classes = FASHION_MNIST_CLASSES  # type: ignore[attr-defined]
    return ds.subset(subset, subset_seed)


@register_dataset("digits", paper="UCI optical digits, via scikit-learn")
def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0,
           subset: int | None = None) -> TensorDataset:
    """scikit-learn digits: 1,797 images, x (1, 8, 8) in [0, 1], 10 classes; a seeded stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    sel = tr if split == "train" else te
    if split not in ("train", "test"):
        raise ValueError(f"digits: split must be 'train' or 'test', got {split!r}")
    x = torch.from_numpy(d.images[sel] / 16.0).float().unsqueeze(1)
    y = torch.from_numpy(d.target[sel].astype(np.int64))
    return TensorDataset(x, y, 10, "digits", {"split": split, "test_fraction": test_fraction, "seed": seed}
                         ).subset(subset)


@register_dataset("mnist1d", paper="Greydanus & Kobak. Scaling Down Deep Learning with MNIST-1D (ICML 2024)")
def mnist1d(split: str = "train", num_samples: int = 5000, seed: int = 42,
            subset: int | None = None) -> TensorDataset:
    """MNIST-1D generated locally (mnist1d.make_dataset): x (1, 40), 10 classes, 80/20 split."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)  # fully offline; never get_dataset(download=True)
    key_x, key_y = ("x", "y") if split == "train" else ("x_test", "y_test")
    if split not in ("train", "test"):
        raise ValueError(f"mnist1d: split must be 'train' or 'test', got {split!r}")
    x = torch.from_numpy(np.asarray(d[key_x], dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(d[key_y]).astype(np.int64))
    return TensorDataset(x, y, 10, "mnist1d", {"split": split, "num_samples": num_samples, "seed": seed}
                         ).subset(subset)
