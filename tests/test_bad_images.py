"""Real image folders: bad, odd and hidden files. One clear error naming each bad file, or a
recorded skip; hidden entries ignored; every PIL mode decoded as its RGB conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import featstore
from featstore import errors
from featstore.cli import main

from .conftest import make_image_folder, tree_listing


def _tiny(folder, store, *extra):
    return ["build", "--model", "test_resnet", "--weights", "random", "--dataset", f"imagefolder:{folder}",
            "--image-size", "32", "--workers", "0", "--splits", "train,test", "--store", str(store), "--no-progress",
            "--dtype", "float32", *extra]


@pytest.fixture
def messy(tmp_path):
    """A class-per-folder tree with every kind of bad, hidden and odd entry."""
    root = make_image_folder(tmp_path / "messy", n_classes=3, per_class=6)
    good = (root / "class_0" / "img_000.png").read_bytes()
    jpg = root / "class_1" / "photo.jpg"
    Image.open(root / "class_1" / "img_000.png").convert("RGB").save(jpg, quality=95)
    bad = {
        root / "class_0" / "empty.jpg": "empty",
        root / "class_1" / "half.png": "truncated or corrupt",
        root / "class_1" / "half.jpg": "truncated or corrupt",
        root / "class_2" / "notes.jpg": "not an image",
    }
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    (root / "class_1" / "half.png").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "half.jpg").write_bytes(jpg.read_bytes()[:200])
    (root / "class_2" / "notes.jpg").write_text("not a picture")
    # hidden entries, ignored: a notebook's checkpoints (as a class and inside one), macOS files
    for hidden in (root / ".ipynb_checkpoints", root / "class_0" / ".ipynb_checkpoints"):
        hidden.mkdir()
        (hidden / "img_000-checkpoint.png").write_bytes(good)
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "class_2" / "._img_000.png").write_bytes(b"AppleDouble")
    return root, bad


def test_fail_names_every_bad_file_and_builds_nothing(tmp_path, messy, capsys):
    root, bad = messy
    store = tmp_path / "s.zarr"
    assert main(_tiny(root, store)) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore build: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "4 bad image files" in err and "Nothing was built" in err and "--bad-images skip" in err
    for path, reason in bad.items():
        assert f"{path}: {reason}" in err
    assert not store.exists()  # checked before any group: nothing left building


def test_skip_leaves_them_out_and_records_them(tmp_path, messy, capsys):
    root, bad = messy
    store = tmp_path / "s.zarr"
    assert main(_tiny(root, store, "--bad-images", "skip")) == 0
    groups = featstore.open(store).groups()
    assert sorted(g.spec.split for g in groups) == ["test", "train"]
    assert all(g.classes == ["class_0", "class_1", "class_2"] for g in groups)  # no hidden class
    # the 18 good PNGs and the good JPEG, each in exactly one split; no hidden or bad file
    ids = [s for g in groups for s in g.sample_ids]
    assert sum(g.n_samples for g in groups) == 3 * 6 + 1 == len(set(ids))
    assert not any(".ipynb" in s or "._" in s or s.endswith(".DS_Store") for s in ids)
    skipped = {s["sample"]: s["reason"] for g in groups for s in g.skipped}
    assert set(skipped) == {str(p.relative_to(root)) for p in bad}
    assert all(skipped[str(p.relative_to(root))].startswith(why) for p, why in bad.items())
    for g in groups:  # each group records the files its own split left out
        capsys.readouterr()
        assert main(["info", g.name, "--store", str(store)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert sorted(s["sample"] for s in info["skipped"]) == sorted(s["sample"] for s in g.skipped)
        assert dict(map(tuple, info["spec"]["extra"]))["bad_images"] == "skip"
    # the policy and the skipped set are in the key: a clean copy under the default is another group
    clean = make_image_folder(tmp_path / "clean", n_classes=3, per_class=6)
    (h,) = featstore.build("test_resnet", weights="random", dataset=f"imagefolder:{clean}", image_size=32, workers=0,
                           progress=False, splits="train", store=tmp_path / "t.zarr", dtype="float32")
    assert all(g.spec.extra != () for g in groups)
    assert h.spec.extra == () and h.skipped == []


def test_a_file_that_fails_only_in_the_pass_stops_it_resumably(tmp_path, messy, capsys):
    """--no-check: the pass stops at the batch holding the bad file and names it; the group
    stays 'building', and after the file is replaced the same command finishes it."""
    root, bad = messy
    for path in bad:
        path.unlink()
    half = root / "class_1" / "half.png"
    good = (root / "class_1" / "img_001.png").read_bytes()
    half.write_bytes(good[: len(good) // 2])
    store = tmp_path / "s.zarr"
    assert main(_tiny(root, store, "--no-check", "--batch-size", "4", "--chunk-rows", "8")) == 2
    err = capsys.readouterr().err
    assert f"{half}: " in err and "re-run the same command" in err and "Traceback" not in err
    (g,) = featstore.open(store).groups(include_incomplete=True)
    assert g.state == "building"
    half.write_bytes(good)  # replaced by a good image
    assert main(_tiny(root, store, "--no-check", "--batch-size", "4", "--chunk-rows", "8")) == 0
    assert featstore.open(store).group(g.name).is_complete


def test_empty_class_folder_is_an_error_or_a_skipped_class(tmp_path):
    root = make_image_folder(tmp_path / "tree", n_classes=3, per_class=4)
    for f in (root / "class_1").iterdir():
        f.unlink()
    (root / "class_1" / ".hidden.png").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(errors.InvalidDatasetError, match="class folders without images under .*: class_1"):
        featstore.load_split(f"imagefolder:{root}", "train")
    with pytest.warns(UserWarning, match="class folders without images .* left out: class_1"):
        src = featstore.load_split(f"imagefolder:{root}", "train", bad_images="skip")
    assert src.classes == ["class_0", "class_2"]


def test_a_decompression_bomb_is_a_named_bad_file(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "tree", n_classes=2, per_class=3, size=20)
    big = root / "class_0" / "big.png"
    Image.new("RGB", (60, 60)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 20 x 20 images pass, 60 x 60 is a "bomb"
    with pytest.raises(errors.BadImagesError, match=r"big.png: decompression bomb"):
        featstore.build("test_resnet", weights="random", dataset=f"imagefolder:{root}", image_size=32, workers=0,
                        progress=False, splits="train", store=tmp_path / "s.zarr")
    assert tree_listing(tmp_path / "s.zarr") == []


MODES = ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F"]


def _in_mode(rgb: Image.Image, mode: str) -> tuple[Image.Image, Image.Image]:
    """(the image in ``mode``, its RGB conversion as featstore defines it)."""
    gray = rgb.convert("L")
    a = np.asarray(gray, dtype=np.float64)
    if mode in ("I;16", "I"):  # 16-bit gray: 0..65535 maps onto 0..255 by / 257
        img = Image.fromarray((a * 257).astype(np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
        return img, gray.convert("RGB")
    if mode == "F":
        return Image.fromarray((a / 255.0).astype(np.float32), "F"), gray.convert("RGB")
    img = rgb.convert(mode)
    return img, img.convert("RGB")


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_decodes_as_its_rgb_conversion(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    img, want = _in_mode(rgb, mode)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "PA") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    with Image.open(path) as check:
        assert check.mode.startswith(mode.split(";")[0])  # the file really holds that mode
    got = featstore.datasets.open_image(path)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_exif_orientation_is_applied(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "x.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(featstore.datasets.open_image(tmp_path / "x.png")), np.asarray(rgb))


def test_odd_modes_give_the_features_of_their_rgb_conversions(tmp_path):
    """A tree of odd-mode files and a tree of their RGB conversions build equal features."""
    rng = np.random.default_rng(3)
    odd, plain = tmp_path / "odd", tmp_path / "plain"
    for c in range(2):
        for i, mode in enumerate(MODES):
            rgb = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
            img, want = _in_mode(rgb, mode)
            fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "PA") else "PNG"
            for root, im, f in ((odd, img, fmt), (plain, want, "PNG")):
                (root / f"c{c}").mkdir(parents=True, exist_ok=True)
                im.save(root / f"c{c}" / f"{i:02d}.{f.lower()}", format=f)
    kw = dict(model="test_resnet", weights="random", image_size=32, workers=0, progress=False, splits="train",
              dtype="float32")
    (a,) = featstore.build(**kw, dataset=f"imagefolder:{odd}", store=tmp_path / "a.zarr")
    (b,) = featstore.build(**kw, dataset=f"imagefolder:{plain}", store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def _fake_pets(root, rng):
    """An Oxford-IIIT Pets tree in torchvision's layout (images/, annotations/{trainval,test}.txt)."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    for split, n in (("trainval", 4), ("test", 2)):
        lines = []
        for c, breed in enumerate(("Abyssinian", "beagle")):
            for i in range(n):
                stem = f"{breed}_{split}{i}"
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(base / "images" / f"{stem}.jpg")
                lines.append(f"{stem} {c + 1} {c + 1} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return base / "images"


def test_file_backed_torchvision_datasets_follow_the_same_rules(tmp_path):
    """oxford-pets (torchvision reads its files): a bad file is named before any group, or
    skipped and recorded; images decode through the same rule as image folders (EXIF)."""
    images = _fake_pets(tmp_path / "pets", np.random.default_rng(4))
    (images / "beagle_trainval1.jpg").write_bytes(b"")
    rgb = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.transpose(Image.Transpose.ROTATE_90).save(images / "Abyssinian_trainval0.jpg", exif=exif, quality=100)
    kw = dict(model="test_resnet", weights="random", dataset="oxford-pets", root=tmp_path / "pets", image_size=32,
              workers=0, progress=False, splits="train", dtype="float32")
    with pytest.raises(errors.BadImagesError, match=r"beagle_trainval1.jpg: empty"):
        featstore.build(**kw, store=tmp_path / "a.zarr")
    assert tree_listing(tmp_path / "a.zarr") == []
    (g,) = featstore.build(**kw, store=tmp_path / "b.zarr", bad_images="skip")
    assert g.n_samples == 7 and [s["reason"] for s in g.skipped] == ["empty"]
    src = featstore.load_split("oxford-pets", "train", root=tmp_path / "pets")
    assert src.image(0).size == (24, 16)  # EXIF orientation applied, as for an image folder
