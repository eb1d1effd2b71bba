"""Safe outputs: refuse to overwrite inputs, refuse existing outputs, write atomically.

Every writer goes through :func:`check_output` and then :func:`atomic_file` or
:func:`atomic_dir`, so that a failing write leaves nothing behind (no partial file, no
half-written series folder) and an existing output is replaced in one ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import OutputExistsError

TMP_MARK = ".strainer-tmp-"


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output(path: str | os.PathLike, *, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Validate an output path and return it resolved.

    Raises :class:`OutputExistsError` when ``path`` is one of the ``protect`` paths (the
    inputs), when it is a folder holding one of them (replacing it would delete the input), or
    when it exists and ``overwrite`` is false. Inputs are refused even with ``overwrite=True``.
    An existing *empty* folder is not treated as an existing output.
    """
    out = _resolve(path)
    for p in protect:
        if p is None:
            continue
        src = _resolve(p)
        if out == src:
            raise OutputExistsError(f"{path}: refusing to overwrite an input")
        if _is_within(src, out):
            raise OutputExistsError(f"{path}: refusing to replace a folder that holds an input "
                                    f"({src.name})")
    if out.is_dir() and not any(out.iterdir()):
        return out
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{path}: output exists (use --overwrite to replace it)")
    return out


def _tmp_name(path: Path) -> Path:
    """A hidden temporary sibling that keeps the suffixes (nibabel picks gzip by suffix)."""
    name = path.name
    suffix = "".join(path.suffixes) if path.suffixes else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    return path.with_name(f".{stem}{TMP_MARK}{uuid.uuid4().hex[:8]}{suffix}")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        if path.is_dir():
            raise OutputExistsError(f"{path}: a folder is in the way of the output file")
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmpdir)`` on a temporary folder next to ``path``, then rename it into place.

    An existing ``path`` (already cleared by :func:`check_output`) is moved aside first and
    deleted only after the new folder is in place.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.mkdir()
    old = None
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        if path.exists() or path.is_symlink():
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
            else:
                old = path.with_name(f".{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file, fsync, rename); parent
    folders are created. Values JSON cannot hold are written as their ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
