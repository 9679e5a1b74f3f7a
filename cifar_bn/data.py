"""CIFAR-10 through torchvision, loaded once into tensors with the notebook's preprocessing.

The notebook (CS231n ``get_CIFAR10_data``): raw 0..255 pixels as float32, minus the mean image of
the training split; 49,000 train / 1,000 val (the next 1,000 training images) / 1,000 test.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor

FOLDER = torchvision.datasets.CIFAR10.base_folder  # "cifar-10-batches-py"
NUM_CLASSES = 10


class DataError(ValueError):
    """The data set cannot be loaded from the folder given; the message says why and what to do."""


def _files_exist(root: str) -> bool:
    c = torchvision.datasets.CIFAR10
    files = [name for name, _ in c.train_list + c.test_list] + [c.meta["filename"]]
    return all(os.path.isfile(os.path.join(root, FOLDER, f)) for f in files)


class _CIFAR10ExistenceOnly(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 with the md5 comparison replaced by an existence check."""

    def _check_integrity(self) -> bool:
        return _files_exist(self.root)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


@dataclass
class CIFAR10Data:
    """Tensors of the three splits: X_* float32 (N, 3, 32, 32), y_* int64 (N,)."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    mean_image: Tensor

    def subset(self, num_train: int) -> "CIFAR10Data":
        """The same data with only the first num_train training images (mean image unchanged)."""
        if num_train > len(self.X_train):
            raise DataError(f"--num-train {num_train} is more than the {len(self.X_train)} training images available")
        return CIFAR10Data(self.X_train[:num_train], self.y_train[:num_train], self.X_val, self.y_val,
                           self.X_test, self.y_test, self.mean_image)


HOW_TO_GET = (f"to get it, run once with network access (torchvision downloads it into --data-dir), or "
              f"download {torchvision.datasets.CIFAR10.url} and extract it so that --data-dir holds {FOLDER}/")


def _open(root: str, train: bool, verify: bool) -> torchvision.datasets.CIFAR10:
    folder = os.path.join(root, FOLDER)
    if not verify:
        if not os.path.isdir(folder):
            raise DataError(f"CIFAR-10 not found: {os.path.abspath(folder)} does not exist (--data-dir {root!r} "
                            f"must hold {FOLDER}/); {HOW_TO_GET}")
        if not _files_exist(root):
            raise DataError(f"CIFAR-10 is incomplete in {folder}: --no-verify skips only the md5 comparison, "
                            f"the files data_batch_1..5, test_batch and batches.meta must still exist; "
                            f"replace the folder with a complete copy ({HOW_TO_GET})")
        try:
            return _CIFAR10ExistenceOnly(root, train=train)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise DataError(f"CIFAR-10 in {folder} exists but a file does not unpickle as torchvision's layout "
                            f"({type(e).__name__}: {e}); replace the folder with an intact copy") from None
    if os.path.isdir(folder):
        try:
            return torchvision.datasets.CIFAR10(root, train=train, download=False)
        except RuntimeError as e:
            raise DataError(f"CIFAR-10 in {folder} failed torchvision's md5 integrity check ({e}). If the files "
                            f"are a re-encoded copy of the data set, pass --no-verify to skip only the md5 "
                            f"comparison; otherwise move the folder aside so a fresh copy is downloaded") from None
    root_existed = os.path.isdir(root)
    try:
        return torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as e:  # no network, DNS failure, refused connection: all end the same way
        if not root_existed and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)  # torchvision made it for the download; leave nothing behind
        raise DataError(f"CIFAR-10 not found: {os.path.abspath(folder)} does not exist (--data-dir {root!r} must "
                        f"hold {FOLDER}/), and downloading it failed ({type(e).__name__}: {e}); download "
                        f"{torchvision.datasets.CIFAR10.url} elsewhere and extract it so that --data-dir holds "
                        f"{FOLDER}/") from None


def _to_tensors(ds: torchvision.datasets.CIFAR10) -> tuple[Tensor, Tensor]:
    # torchvision keeps HWC uint8; the model wants CHW float32, as the notebook's X arrays.
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).to(torch.float32).contiguous()
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def load_cifar10(data_dir: str = "./data", num_train: int | None = None, num_val: int = 1000,
                 num_test: int = 1000, verify: bool = True) -> CIFAR10Data:
    """Load CIFAR-10 and split it as the notebook does.

    Inputs: data_dir holds (or receives, when missing and the network answers) the torchvision
    folder cifar-10-batches-py; num_val: the last num_val training images are the validation set,
    the rest (49,000 of 50,000) the training split; num_train: keep only its first num_train
    images (None: all); num_test: the first test images; verify=False skips only the md5
    comparison. Output: CIFAR10Data minus the mean image of the whole training split (as the
    notebook, which subtracts the 49,000-image mean before taking small subsets).
    Raises DataError (with what to do) when the files are missing, corrupt or too few.
    """
    x_all, y_all = _to_tensors(_open(data_dir, train=True, verify=verify))
    x_test, y_test = _to_tensors(_open(data_dir, train=False, verify=verify))
    split = len(x_all) - num_val
    if split < 1 or num_test > len(x_test):
        raise DataError(f"asked for {num_val} validation of {len(x_all)} training images and {num_test} of "
                        f"{len(x_test)} test images in {data_dir}; ask for fewer")
    x_train, y_train = x_all[:split], y_all[:split]
    mean_image = x_train.mean(0)
    data = CIFAR10Data(x_train - mean_image, y_train, x_all[split:] - mean_image, y_all[split:],
                       x_test[:num_test] - mean_image, y_test[:num_test], mean_image)
    return data if num_train is None else data.subset(num_train)
