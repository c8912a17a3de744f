"""Datasets: the offline defaults (``digits16``, ``photos32``) and the user's own images.

All datasets become one :class:`ImageDataset`: float images in [-1, 1] shaped N x C x H x W plus integer
labels where the source has them (attacks such as TrojDiff In-D2D need classes). Nothing is downloaded.

User data: an image folder (class sub-folders give labels), a CIFAR-10 python-pickle directory (read with
an unpickler that only builds numpy arrays), or a ``.npz`` with ``images`` (N,H,W[,C] or N,C,H,W) and an
optional ``labels`` array.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from terd.errors import TerdError

BUILTIN = ("digits16", "photos32")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageDataset:
    images: torch.Tensor  # N x C x H x W in [-1, 1]
    labels: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def of_class(self, label: int) -> torch.Tensor:
        if self.labels is None:
            raise TerdError(f"dataset {self.name!r} has no labels")
        picked = self.images[self.labels == label]
        if len(picked) == 0:
            raise TerdError(f"dataset {self.name!r} has no images of class {label}")
        return picked


def _from_uint8(arr: np.ndarray) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W float in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def conform(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """Match channel count (grayscale = luminance) and square size (antialiased bilinear)."""
    c = images.shape[1]
    if channels is not None and c != channels:
        if channels == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * w).sum(1, keepdim=True)
        elif channels == 3 and c == 1:
            images = images.repeat(1, 3, 1, 1)
        else:
            raise TerdError(f"cannot convert {c}-channel images to {channels} channels")
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(-1, 1)


def digits16() -> ImageDataset:
    """scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 1 x 16 x 16, labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0 * 2 - 1
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    return ImageDataset(x, torch.from_numpy(d.target).long(), "digits16")


_PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                "colorwheel")


def _photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    photos += [getattr(skimage.data, n)()[..., :3] for n in _PHOTO_NAMES]
    return photos


def photos32(n: int = 4096, seed: int = 0) -> ImageDataset:
    """Random 3 x 32 x 32 crops of the photos shipped with scikit-learn and scikit-image.

    Each photo is shrunk so its short side is 96 px (crops then show objects, not flat texture); the
    label is the index of the source photo.
    """
    rng = np.random.default_rng(seed)
    photos = []
    for p in _photos():
        img = Image.fromarray(p)
        scale = 96 / min(img.size)
        photos.append(np.asarray(img.resize((round(img.size[0] * scale), round(img.size[1] * scale)),
                                            Image.BICUBIC)))
    crops, labels = [], []
    for i in range(n):
        k = i % len(photos)
        h, w = photos[k].shape[:2]
        y, x = rng.integers(0, h - 32 + 1), rng.integers(0, w - 32 + 1)
        crop = photos[k][y:y + 32, x:x + 32]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        labels.append(k)
    return ImageDataset(_from_uint8(np.ascontiguousarray(np.stack(crops))), torch.tensor(labels), "photos32")


def _image_folder(path: Path) -> ImageDataset:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise TerdError(f"{path}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files})
    images = []
    size = None
    for p in files:
        try:
            img = np.asarray(Image.open(p).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise TerdError(f"{p}: unreadable image ({exc})") from None
        if size is None:
            size = img.shape[:2]
        elif img.shape[:2] != size:
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
        images.append(img)
    labels = torch.tensor([classes.index(p.parent.relative_to(path).as_posix()) for p in files])
    return ImageDataset(_from_uint8(np.stack(images)), labels if len(classes) > 1 else None, path.name)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow numpy array reconstruction and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_dir(path: Path) -> ImageDataset:
    batches = sorted(path.glob("data_batch_*"))
    if not batches:
        raise TerdError(f"{path}: no data_batch_* files (CIFAR-10 python format)")
    xs, ys = [], []
    for b in batches:
        try:
            with b.open("rb") as fh:
                d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as exc:
            raise TerdError(f"{b}: not a CIFAR-10 batch ({exc})") from None
    x = torch.from_numpy(np.concatenate(xs)).float() / 127.5 - 1.0
    return ImageDataset(x, torch.from_numpy(np.concatenate(ys)).long(), "cifar10")


def _npz(path: Path) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise TerdError(f"{path}: expected an 'images' array (found {', '.join(z.files) or 'none'})")
            arr = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (ValueError, OSError) as exc:
        raise TerdError(f"{path}: unreadable .npz ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise TerdError(f"{path}: 'images' must be N x H x W [x C] or N x C x H x W, got shape {arr.shape}")
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0 if arr.dtype == np.uint8 or x.max() > 1.5 else (x * 2 - 1 if x.min() >= 0 else x)
    lab = torch.from_numpy(np.asarray(labels)).long() if labels is not None else None
    if lab is not None and len(lab) != len(x):
        raise TerdError(f"{path}: {len(lab)} labels for {len(x)} images")
    return ImageDataset(x.clamp(-1, 1), lab, path.stem)


def load_dataset(source: str, *, channels: int | None = None, size: int | None = None) -> ImageDataset:
    """A built-in name or a path, conformed to ``channels`` x ``size`` x ``size`` when given."""
    if source == "digits16":
        ds = digits16()
    elif source == "photos32":
        ds = photos32()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise TerdError(f"{source}: unknown dataset (built-in: {', '.join(BUILTIN)}) and no such path")
        if path.is_file() and path.suffix == ".npz":
            ds = _npz(path)
        elif path.is_dir() and any(path.glob("data_batch_*")):
            ds = _cifar_dir(path)
        elif path.is_dir():
            ds = _image_folder(path)
        else:
            raise TerdError(f"{path}: unsupported dataset (image folder, CIFAR-10 directory or .npz)")
    ds.images = conform(ds.images, channels, size)
    return ds
