"""Datasets: built-in defaults and the user's own images, conformed to the model's shape."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from terd.data import conform, digits16, load_dataset, photos32
from terd.errors import TerdError


def test_digits16_shape_range_labels():
    ds = digits16()
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert set(ds.labels.tolist()) == set(range(10))
    assert ds.of_class(7).shape[1:] == (1, 16, 16)


def test_photos32_is_deterministic_and_labelled():
    a, b = photos32(n=64), photos32(n=64)
    assert a.images.shape == (64, 3, 32, 32)
    assert torch.equal(a.images, b.images)
    assert a.labels.max() >= 5  # crops come from several source photos
    assert a.images.std() > 0.2  # real content, not flat colour


def test_conform_channels_and_size():
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    gray = conform(rgb, 1, 16)
    assert gray.shape == (2, 1, 16, 16)
    assert conform(gray, 3, 16).shape == (2, 3, 16, 16)


def test_image_folder_with_classes(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), channels=3, size=16)
    assert ds.images.shape == (6, 3, 16, 16)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_cifar_pickle_dir(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (10, 3072), dtype=np.uint8)
    with (tmp_path / "data_batch_1").open("wb") as fh:
        pickle.dump({b"data": data, b"labels": list(range(10))}, fh)
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (10, 3, 32, 32) and ds.labels.tolist() == list(range(10))
    assert abs(ds.images[0, 0, 0, 0].item() - (data[0, 0] / 127.5 - 1.0)) < 1e-6


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    with (tmp_path / "data_batch_1").open("wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(TerdError, match="not a CIFAR-10 batch"):
        load_dataset(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float01", "nhw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    arr = {
        "nhwc_uint8": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        "nchw_float01": rng.random((4, 3, 8, 8)).astype(np.float32),
        "nhw": rng.random((4, 8, 8)).astype(np.float32),
    }[layout]
    np.savez(tmp_path / "d.npz", images=arr, labels=np.arange(4))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.images.shape[0] == 4 and ds.images.shape[-2:] == (8, 8)
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.min() < -0.5


def test_bad_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(TerdError, match="unknown dataset"):
        load_dataset("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TerdError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 4, 4)))
    with pytest.raises(TerdError, match="'images'"):
        load_dataset(str(tmp_path / "x.npz"))
