"""Stores on object storage (any fsspec URL, e.g. ``s3://bucket/featstore.zarr``).

Reading needs nothing special: :func:`featstore.open` takes a URL (credentials from the
usual environment, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``,
or ``storage_options``). Writing goes through :func:`push`, which copies complete groups
from a local store so that a group becomes visible at the URL only when it is whole: every
array file first, the group's own ``zarr.json`` (its metadata, which is what makes it a
group) last. An interrupted push leaves no visible partial group, and the same push
resumes it, uploading only the files not yet there with their full size.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import faults
from .errors import IncompleteGroupError, NotAFeatureStoreError, RemoteStoreError, StaleGroupError
from .fileio import is_temporary

__all__ = ["push", "parse_storage_options", "remote_fs", "put_new_group"]

_AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
               "403", "401")


def parse_storage_options(items) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the CLI's ``--storage-option``) as a dict of strings: values stay
    text, never turned into numbers or booleans."""
    from .errors import InvalidParameterError

    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise InvalidParameterError(key="--storage-option", value=item, expected="KEY=VALUE")
        out[key] = value
    return out


def _explain(url: str, e: BaseException) -> RemoteStoreError:
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, PermissionError) or any(code in text for code in _AUTH_CODES):
        return RemoteStoreError(url=url, reason=f"the credentials were refused ({text})",
                                fix="Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or --storage-option key=... "
                                    "secret=...) and the endpoint (AWS_ENDPOINT_URL or --storage-option "
                                    "endpoint_url=...)")
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text:
        return RemoteStoreError(url=url, reason=f"the bucket does not exist ({text})",
                                fix="Create the bucket first (featstore never creates buckets) or fix the URL")
    return RemoteStoreError(url=url, reason=f"it cannot be reached ({text})",
                            fix="Check the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=...) "
                                "and the network")


def remote_fs(url: str, storage_options: dict | None = None):
    """``(filesystem, root path)`` of a URL whose bucket exists and accepts the credentials;
    a missing bucket, refused credentials or an unreachable endpoint is one RemoteStoreError."""
    import fsspec

    if str(url).startswith(("s3://", "s3a://")):
        from ._extras import require

        require("s3fs", "an s3:// store")
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        bucket = root.split("/", 1)[0]
        fs.ls(bucket, refresh=True)  # the bucket exists and these credentials may list it
    except Exception as e:  # noqa: BLE001 - every backend raises its own; one message for all
        raise _explain(url, e) from None
    return fs, root.rstrip("/")


def push(store: str | os.PathLike, url: str, groups=(), storage_options: dict | None = None,
         progress: bool = True) -> list[tuple[str, str]]:
    """Copy complete groups of a local store to ``url``; returns ``[(group, "pushed" |
    "already there" | "restored N file(s)"), ...]``.

    Every named group is checked (exists, complete, every chunk verified) before anything is
    uploaded. A group already at the URL with the same spec gets back any file it lost there (a
    deleted chunk); one whose metadata differs is refused. Re-running an interrupted push
    resumes it.
    """
    import json

    from tqdm.auto import tqdm

    from ._store import ROOT_MARK, FeatureStore

    src = FeatureStore(store, mode="r")
    chosen = [src.group(n) for n in groups] if groups else src.groups()
    for g in chosen:
        if not g.is_complete:
            raise IncompleteGroupError(name=g.name, store=src.path, state=g.state)
        g.check_readable()  # every chunk present and holding what its build wrote: never push a damaged group
    fs, root = remote_fs(url, storage_options)
    try:
        remote_root = f"{root}/zarr.json"
        if fs.exists(remote_root):
            mark = json.loads(fs.cat_file(remote_root)).get("attributes", {}).get(ROOT_MARK)
            if not isinstance(mark, dict):
                raise NotAFeatureStoreError(path=url, reason=f"a Zarr hierarchy (or file) that featstore did not "
                                                             f"write (no '{ROOT_MARK}' attribute); choose another URL")
        else:
            fs.pipe_file(remote_root, (Path(src.path) / "zarr.json").read_bytes())
        done = []
        for g in chosen:
            local = Path(src.path) / g.name
            meta_remote = f"{root}/{g.name}/zarr.json"
            local_meta = (local / "zarr.json").read_bytes()
            there = fs.exists(meta_remote)
            if there and json.loads(fs.cat_file(meta_remote)) != json.loads(local_meta):
                raise StaleGroupError(name=g.name, store=url, reason="the group at the URL has other metadata "
                                                                      "than the local one; remove it there first")
            files = sorted(p for p in local.rglob("*") if p.is_file() and not is_temporary(p.name)
                           and p != local / "zarr.json")
            have = {}
            if fs.exists(f"{root}/{g.name}"):
                have = {k[len(root) + 1:]: v["size"] for k, v in
                        fs.find(f"{root}/{g.name}", detail=True).items()}
            # a file missing at the URL (a chunk deleted there) or cut short by an interruption
            wanted = [p for p in files if have.get(p.relative_to(src.path).as_posix()) != p.stat().st_size]
            if there and not wanted:
                done.append((g.name, "already there"))
                continue
            with tqdm(total=sum(p.stat().st_size for p in wanted), unit="B", unit_scale=True, disable=not progress,
                      desc=f"push {g.name[:40]}", dynamic_ncols=True) as bar:
                for p in wanted:
                    fs.put_file(str(p), f"{root}/{p.relative_to(src.path).as_posix()}")
                    faults.point("push-file")
                    bar.update(p.stat().st_size)
            if there:
                done.append((g.name, f"restored {len(wanted)} file(s)"))
                continue
            fs.pipe_file(meta_remote, local_meta)  # last: the group exists at the URL from here on
            done.append((g.name, "pushed"))
    except (RemoteStoreError, NotAFeatureStoreError, StaleGroupError):
        raise
    except OSError as e:
        raise _explain(url, e) from None
    return done


def put_new_group(fs, root: str, local: Path, name: str) -> None:
    """Upload a group made in a local folder to ``root/name``: every array file first, its
    ``zarr.json`` last (what makes it a group: before that, nothing is listed at the URL)."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p != local / "zarr.json")
    for p in files:
        fs.put_file(str(p), f"{root}/{name}/{p.relative_to(local).as_posix()}")
    faults.point("group-created")
    fs.pipe_file(f"{root}/{name}/zarr.json", (local / "zarr.json").read_bytes())
