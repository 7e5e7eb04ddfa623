"""Dataset registry: embedded Fashion-MNIST, digits, image folders, stratified limits."""

from __future__ import annotations

import numpy as np
import pytest

import featstore
from featstore import errors
from featstore.datasets import DATASETS, DEBIAN_FASHION_MNIST, load_split, stratified_subset


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
    import featstore.datasets as d

    monkeypatch.setattr(d, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(errors.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist.*--download"):
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


def test_dataset_names_are_parsed_once_and_folders_match_whole_components(tmp_path):
    """``imagefolder:`` is read by one parser; a folder name matches a recorded path by whole
    components (imagenet is not tiny-imagenet)."""
    from featstore import parse_dataset_name

    assert parse_dataset_name("imagefolder:data/x") == featstore.DatasetName("imagefolder", "data/x")
    assert parse_dataset_name("digits") == featstore.DatasetName("", "digits")
    q = parse_dataset_name("imagefolder:imagenet")
    assert q.matches("imagefolder:/data/imagenet") and q.matches("imagefolder:/data/imagenet/")
    assert not q.matches("imagefolder:/data/tiny-imagenet") and not q.matches("digits")
    assert parse_dataset_name("imagefolder:data/imagenet").matches("imagefolder:/srv/data/imagenet")
    assert not parse_dataset_name("imagefolder:data/imagenet").matches("imagefolder:/srv/old-data/imagenet")
    assert parse_dataset_name("imagefolder:/data/imagenet").matches("imagefolder:/data/imagenet")
    assert not parse_dataset_name("imagefolder:/data/imagenet").matches("imagefolder:/mnt/data/imagenet")
    assert parse_dataset_name("digits").matches("digits") and not parse_dataset_name("digits").matches("cifar10")
    assert parse_dataset_name(f"imagefolder:{tmp_path.name}").matches(f"imagefolder:{tmp_path}")


def test_bad_dataset_names():
    with pytest.raises(errors.UnknownNameError, match="Unknown dataset 'cifar-10'; known: cifar10, cifar100"):
        load_split("cifar-10", "train")
    with pytest.raises(errors.InvalidParameterError, match=r"dataset: expected a registry name \(cifar10, .*\); for files "
                                                           r"use a source prefix \(imagefolder:PATH, hf:.*, csv:FILE, "
                                                           r"parquet:FILE\); got '\.\./etc'"):
        load_split("../etc", "train")
    with pytest.raises(errors.UnknownNameError, match="Unknown split 'val' for dataset 'digits'; known: test, train"):
        load_split("digits", "val")
    with pytest.raises(errors.InvalidParameterError, match="is not a directory"):
        load_split("imagefolder:/nonexistent/path", "train")


@pytest.mark.parametrize("name", [n for n, e in DATASETS.items() if e.needs_root])
def test_torchvision_dataset_missing_says_download(tmp_path, name):
    with pytest.raises(errors.DatasetNotFoundError, match="not found: .*Pass --download"):
        load_split(name, DATASETS[name].splits[0], root=tmp_path)


def test_by_index_reads_each_folder_name_as_the_class_index(tmp_path):
    """ImageNetV2-shaped: 1000 numeric class folders (listed as strings sort: 0, 1, 10, 100, ...)
    against 1000 training classes in sorted WordNet-id order; by-index maps every folder to the
    class its name says, as the released code's {name: int(name)} does, and every image with it."""
    from PIL import Image

    from featstore.datasets import class_mapping

    train = [f"n{i:08d}" for i in range(1000)]  # sorted WordNet ids: position = index
    tree = tmp_path / "imagenetv2"
    for i in range(1000):
        (tree / str(i)).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (4, 4), (i % 256, j, 0)).save(tree / str(i) / f"{j}.png")
    whole = load_split(f"imagefolder:{tree}", "all")
    assert len(whole) == 2000  # the whole folder, not a seeded 80 %
    assert whole.classes[:4] == ["0", "1", "10", "100"]  # string order, as torchvision lists folders
    mapping = class_mapping(train, whole.classes, "by-index")
    assert mapping.tolist() == [int(name) for name in whole.classes]  # the literal rule, folder by folder
    folder_of = [int(sid.split("/")[0]) for sid in whole.sample_ids]
    assert mapping[whole.targets].tolist() == folder_of  # every image to its folder's index
    assert (mapping != np.arange(1000)).sum() == 1000 - 12  # position would map only 12 folders right


@pytest.mark.parametrize("names, message", [
    (["0", "1", "cat"], r"1 of 3 names are not integers: cat"),
    (["0", "1", "-2"], r"not integers: -2"),
    (["0", "3"], r"1 class names are not indices of the 3 training classes \(0\.\.2\): 3"),
    (["7", "07"], r"class names that read as one index: 7, 07"),
])
def test_by_index_refuses_names_that_are_not_train_class_indices(names, message):
    from featstore.datasets import class_mapping

    with pytest.raises(errors.ClassMapError, match=message):
        class_mapping(["a", "b", "c"] if names != ["7", "07"] else [str(i) for i in range(10)], names, "by-index")


def test_a_folder_without_split_subfolders_offers_its_whole_self(image_folder):
    name = f"imagefolder:{image_folder}"
    assert featstore.dataset_splits(name) == ("train", "test", "all")
    train, test, whole = (load_split(name, s) for s in ("train", "test", "all"))
    assert len(whole) == len(train) + len(test) == 36
    assert sorted(whole.sample_ids) == sorted([*train.sample_ids, *test.sample_ids])


def test_a_symlink_loop_adds_no_image_and_never_leaks_train_into_test(tmp_path):
    """class a holds `loop -> .` (and a link to its own parent): every file counts once, so the
    seeded split is the one of the plain tree and train and test share no image."""
    from .conftest import make_image_folder

    plain = make_image_folder(tmp_path / "plain", n_classes=2, per_class=10)
    looped = make_image_folder(tmp_path / "looped", n_classes=2, per_class=10)
    (looped / "class_0" / "loop").symlink_to(".")
    (looped / "class_0" / "up").symlink_to("..")
    for split in ("train", "test"):
        a, b = load_split(f"imagefolder:{plain}", split), load_split(f"imagefolder:{looped}", split)
        assert list(a.sample_ids) == list(b.sample_ids) and a.classes == b.classes
    train, test = (load_split(f"imagefolder:{looped}", s) for s in ("train", "test"))
    assert len(train) + len(test) == 20 and not set(train.files) & set(test.files)


def test_one_folder_or_file_under_two_classes_is_an_error_naming_it(tmp_path):
    from .conftest import make_image_folder

    tree = make_image_folder(tmp_path / "t", n_classes=2, per_class=4)
    (tree / "class_9").symlink_to(tree / "class_0", target_is_directory=True)
    with pytest.raises(errors.InvalidDatasetError, match=r"class folder 'class_9' is the folder '.*class_0' again"):
        load_split(f"imagefolder:{tree}", "all")
    (tree / "class_9").unlink()
    (tree / "class_1" / "stolen.png").symlink_to(tree / "class_0" / "img_000.png")
    with pytest.raises(errors.InvalidDatasetError, match=r"stolen\.png' and '.*class_0/img_000\.png' are one file under "
                                                         r"two classes \(class_0, class_1\)"):
        load_split(f"imagefolder:{tree}", "all")


def test_a_pseudo_filesystem_is_refused_before_it_is_walked():
    import time

    t0 = time.monotonic()
    with pytest.raises(errors.InvalidDatasetError, match=r"'/proc' is on a proc filesystem"):
        load_split("imagefolder:/proc", "train")
    assert time.monotonic() - t0 < 5


def test_a_class_named_like_a_split_is_a_class_and_a_mixed_tree_is_explained(tmp_path):
    from .conftest import make_image_folder

    tree = make_image_folder(tmp_path / "t", n_classes=2, per_class=5, names=["cat", "train"])
    assert featstore.dataset_splits(f"imagefolder:{tree}") == ("train", "test", "all")
    assert load_split(f"imagefolder:{tree}", "all").classes == ["cat", "train"]
    mixed = make_image_folder(tmp_path / "m", n_classes=2, per_class=5, split_dirs=True)
    for f in (mixed / "test" / "class_0").iterdir():
        f.rename(mixed / "test" / f.name)  # test/ now holds images itself
    (mixed / "test" / "class_0").rmdir()
    (mixed / "test" / "class_1").rename(tmp_path / "gone")
    with pytest.raises(errors.InvalidDatasetError, match=r"train hold class folders \(split folders\) but test hold "
                                                         r"images \(class folders\)"):
        featstore.dataset_splits(f"imagefolder:{mixed}")
