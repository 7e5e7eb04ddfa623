"""Shared fixtures: tiny synthetic image folders and tiny timm models on tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 12, split_dirs: bool = False,
                      size: int = 20, seed: int = 0, names=None) -> Path:
    """Class-per-folder PNGs whose colour depends on the class, a few of them grayscale. Class c's
    folder is ``names[c]`` (default ``class_{c}``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = ("train", "test") if split_dirs else ("",)
    for split in splits:
        for c in range(n_classes):
            d = root / split / (names[c] if names is not None else f"class_{c}")
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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback: moto's server (as s3fs's own tests use), in its own
    process, with authentication on. Its first three requests (unauthenticated, as moto
    allows with INITIAL_NO_AUTH_ACTION_COUNT) create an IAM user with S3 rights and its
    access key; every request after that must be signed with that key.
    Yields ``{"endpoint": URL, "key": ..., "secret": ...}``."""
    import socket
    import time
    import urllib.request

    pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "MOTO_ALLOW_NONEXISTENT_REGION": "True"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)  # moto's own dashboard: no auth counted
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                       aws_secret_access_key="boot")
    iam.create_user(UserName="featstore")
    iam.put_user_policy(UserName="featstore", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="featstore")["AccessKey"]
    yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The loopback S3 endpoint with valid credentials in the environment (for this process
    and every process it starts) and a fresh, empty bucket. Yields ``(bucket url, server)``."""
    import uuid

    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.filesystem("s3").clear_instance_cache()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}", s3_server
    fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node SLURM (Debian's slurm-wlm + munge) started by ``ci/slurm-local.sh``:
    localhost slurm.conf, proctrack/linuxproc, no cgroups, free ports. SLURM_CONF is set in
    this process's environment (and so every job's) for the session. Skips, with the reason,
    where SLURM cannot be started (not root, not installed); a start that fails as root fails."""
    import shutil
    import socket

    if os.geteuid() != 0:
        pytest.skip("SLURM tests start munged, slurmctld and slurmd, which needs root (CI runs them as root)")
    if not all(shutil.which(p) for p in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("slurm-wlm and munge are not installed: run `ci/slurm-local.sh install` as root (make test does)")
    for _ in range(20):  # two consecutive free ports: slurmctld's and slurmd's
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                    break
                except OSError:
                    continue
    d = tmp_path_factory.mktemp("slurm")
    script = str(REPO / "ci" / "slurm-local.sh")
    r = subprocess.run(["bash", script, "start", str(d)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "SLURM_LOCAL_PORT": str(port)})
    if r.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((d / "log").glob("*.log")))
        subprocess.run(["bash", script, "stop", str(d)], capture_output=True, timeout=60)
        pytest.fail(f"SLURM did not start:\n{r.stdout}\n{r.stderr}\n{logs}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    try:
        yield str(d / "slurm.conf")
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
        subprocess.run(["bash", script, "stop", str(d)], capture_output=True, timeout=60)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
