"""Writing nnU-Net raw datasets safely: checked names and ids, built in a hidden folder, published by a rename.

Every dataset writer of the plugin (synthetic, phantom, unlabeled images, BraTS) goes through `staged_dataset`, so a
failed or killed run never leaves a half-written `Dataset<id>_<name>` that nnU-Net would pick up.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_raw_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw-root", help="nnU-Net raw folder (default: the nnUNet_raw environment variable)")


def raw_root_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--raw-root, else nnUNet_raw, where nnU-Net's commands will look for the dataset; a usage error if neither."""
    raw_root = args.raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        parser.error("no output folder: pass --raw-root or set the nnUNet_raw environment variable")
    return raw_root


def check_free_dataset_id(raw_root: Path, dataset_id: int, folder_name: str) -> None:
    """nnU-Net finds datasets by id, so a second folder with the same id (another name) would be ambiguous."""
    clashes = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p.name != folder_name]
    if clashes:
        raise FileExistsError(f"dataset id {dataset_id} is already used by {', '.join(clashes)} in {raw_root}; "
                              "choose another dataset id or remove that folder")


def check_dataset_name(name: str) -> None:
    """Dataset names become folder names and nnU-Net identifiers: letters, digits, '_' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"dataset name {name!r} must consist of letters, digits, '_' or '-' (e.g. 'Phantom')")


def publish_dataset_folder(staging: Path, target: Path, overwrite: bool) -> None:
    """Move a finished staging folder to its final name; an existing target is replaced only if overwrite."""
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; remove it or pass overwrite=True (--force) to replace it")
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(retired / target.name)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)


@contextmanager
def staged_dataset(target: Path, dataset_id: int, overwrite: bool) -> Iterator[Path]:
    """A hidden staging folder next to `target`, renamed to it only if the block completes (removed otherwise),
    so an interrupted run leaves no half-written dataset that nnU-Net would pick up."""
    check_free_dataset_id(target.parent, dataset_id, target.name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or pass overwrite=True (--force) to replace it")
    # mkdir honours the umask; tempfile.mkdtemp's 0700 would survive the rename and hide the dataset from others
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        publish_dataset_folder(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
