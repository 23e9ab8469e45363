"""Atomic writes of folders and files: a save either lands whole or leaves the previous content untouched."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_directory(target: str | os.PathLike, stale: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh temporary folder next to `target`; on success move its entries into `target`.

    A new `target` appears by a single rename. An existing one gets each written entry swapped in by rename (the old
    entry is moved aside first and deleted only after the new one is in place), and entries named in `stale` that the
    new save did not write are removed. Other files already in `target` are kept. On error nothing in `target` changes.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    set_default_permissions(tmp)  # mkdtemp makes 0700 folders; a saved model is as readable as any new folder
    try:
        yield tmp
        if not os.path.exists(target):
            os.rename(tmp, target)
            return
        written = set(os.listdir(tmp))
        for name in written:
            _swap_in(os.path.join(tmp, name), os.path.join(target, name))
        for name in stale:
            path = os.path.join(target, name)
            if name not in written and os.path.lexists(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success rename it onto `path` (never half-written), else delete it.

    The caller writes the whole file to the yielded path (e.g. `image.save(tmp, format="PNG")`); its extension is
    kept, so writers that pick a format from the name still work.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=os.path.splitext(name)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        set_default_permissions(tmp)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def set_default_permissions(path: str) -> None:
    """Give `path` the mode a plain `open`/`mkdir` would (0666 / 0777 minus the umask), undoing tempfile's 0600/0700."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _swap_in(new: str, dest: str) -> None:
    """Replace `dest` by `new` with renames only, so `dest` is never half-written."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=os.path.dirname(dest))
        os.rmdir(aside)
        os.rename(dest, aside)
        os.rename(new, dest)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, dest)
