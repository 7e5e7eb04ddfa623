"""Dataset registry: embedded Fashion-MNIST, digits, image folders, stratified limits."""

from __future__ import annotations

import numpy as np
import pytest

import featstore
from featstore import errors
from featstore._datasets import DATASETS, DEBIAN_FASHION_MNIST, load_split, stratified_subset


def test_registry_lists_every_dataset_of_the_issue():
    assert set(DATASETS) == {"fashion-mnist", "digits", "cifar10", "cifar100", "flowers102", "oxford-pets"}
    assert "imagefolder:PATH" in featstore.dataset_names()


def test_fashion_mnist_reads_real_images_from_debian_package():
    assert (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), (
        "the embedded dataset is missing: `make setup` installs Debian's dataset-fashion-mnist")
    train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    img = train.image(0)
    assert img.mode == "RGB" and img.size == (28, 28)  # grayscale expanded to 3 channels
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and arr.std() > 10  # a real picture, not blank


def test_fashion_mnist_without_files_explains_how_to_get_them(tmp_path, monkeypatch):
    import featstore._datasets as d

    monkeypatch.setattr(d, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--download"):
        load_split("fashion-mnist", "train", root=tmp_path)


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train) + len(test) == 1797
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert abs(len(test) / 1797 - 0.2) < 0.01
    assert set(np.unique(test.targets)) == set(range(10))
    assert train.image(3).mode == "RGB"
    assert list(load_split("digits", "test").sample_ids) == list(test.sample_ids)


def test_imagefolder_with_split_subfolders(image_folder_splits):
    name = f"imagefolder:{image_folder_splits}"
    assert featstore.dataset_splits(name) == ("train", "test")
    train, test = load_split(name, "train"), load_split(name, "test")
    assert len(train) == 36 and len(test) == 12 and train.classes == test.classes


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 10, 29])
def test_stratified_subset_sizes_and_proportions(limit):
    targets = np.repeat(np.arange(3), [10, 10, 10])
    idx = stratified_subset(targets, limit, seed=0)
    assert len(idx) == limit == len(set(idx)) and (np.diff(idx) > 0).all()
    counts = np.bincount(targets[idx], minlength=3)
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(idx, stratified_subset(targets, limit, seed=0))


def test_stratified_subset_imbalanced_keeps_every_class():
    targets = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = stratified_subset(targets, 10, seed=1)
    assert np.bincount(targets[idx]).tolist() == [8, 1, 1]
    assert not np.array_equal(idx, stratified_subset(targets, 10, seed=2))
    np.testing.assert_array_equal(stratified_subset(targets, None, 0), np.arange(100))
    np.testing.assert_array_equal(stratified_subset(targets, 1000, 0), np.arange(100))


def test_bad_dataset_names():
    with pytest.raises(errors.UnknownNameError, match="Unknown dataset 'cifar-10'; known: cifar10, cifar100"):
        load_split("cifar-10", "train")
    with pytest.raises(errors.InvalidParameterError, match="path separator or '..'"):
        load_split("../etc", "train")
    with pytest.raises(errors.UnknownNameError, match="Unknown split of dataset 'digits' 'val'; known: test, train"):
        load_split("digits", "val")
    with pytest.raises(errors.InvalidParameterError, match="is not a directory"):
        load_split("imagefolder:/nonexistent/path", "train")


def test_torchvision_dataset_missing_says_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_split("cifar10", "train", root=tmp_path)
