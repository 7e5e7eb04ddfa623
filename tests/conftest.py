"""Shared fixtures: tiny synthetic image folders and tiny timm models on tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 12, split_dirs: bool = False,
                      size: int = 20, seed: int = 0) -> Path:
    """Class-per-folder PNGs whose colour depends on the class, a few of them grayscale."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = ("train", "test") if split_dirs else ("",)
    for split in splits:
        for c in range(n_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            count = per_class if split != "test" else max(2, per_class // 3)
            for i in range(count):
                base = np.zeros((size, size, 3))
                base[..., c % 3] = 160 + 20 * (c // 3)
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                pil = Image.fromarray(img)
                if i % 5 == 4:
                    pil = pil.convert("L")  # grayscale images must come out as 3 channels
                pil.save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "tree")


@pytest.fixture(scope="session")
def image_folder_splits(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs_split") / "tree", split_dirs=True)


@pytest.fixture
def tiny(image_folder):
    """Keyword arguments for a fast build: a tiny random timm model at 32 px."""
    return dict(
        model="test_resnet",
        weights="random",
        dataset=f"imagefolder:{image_folder}",
        image_size=32,
        batch_size=5,
        workers=0,
        progress=False,
        chunk_rows=8,
    )


def run_cli(*args, env=None, check=False, cwd=None):
    """Run ``python -m featstore.cli ARGS`` in a fresh process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd or REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featstore {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_listing(path: Path) -> list[str]:
    """Every file and folder below ``path`` (to assert that nothing was written)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """The demo's groups (make demo): tf_efficientnet_lite0 pre_logits, embedded weights,
    Fashion-MNIST 5,000 train + 1,000 test images. About 3 minutes on 2 CPU cores."""
    import featstore

    store = tmp_path_factory.mktemp("demo") / "featstore.zarr"
    featstore.build(splits="train", limit=5000, store=store, progress=False)  # workers: the build's default
    featstore.build(splits="test", limit=1000, store=store, progress=False)
    return store


from .test_sweep import reference, spec_file, sweep_store  # noqa: E402,F401 - shared sweep fixtures
