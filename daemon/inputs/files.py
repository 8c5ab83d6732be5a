"""Files a client may name, opened once and race-free under the operator's allowed directories; and
the operator's own setting files (caches, calibrations), which are opened without ever blocking.

A path is checked and opened in one walk: from the allowed directory, each component is opened
relative to the one before (openat) with O_NOFOLLOW, so no symbolic link is followed anywhere below
the allowed directory, and a component swapped for a link between two requests (or during one) is
refused, never followed. The opened descriptor itself is then checked (fstat: a regular file, its
size), and every later read or decode uses that descriptor: nothing is opened by name a second time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Iterator

from qwen3vl_client.errors import input_error, invalid, too_large

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused right after, by fstat).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)


class SettingFileError(Exception):
    """A setting file that is not a regular file, too large, or not private; the message names it."""


def open_regular(path: Path, private: bool = False):
    """`path` opened for reading in binary, refused unless it is a regular file (a FIFO or a device
    named as a cache or a calibration would block the start forever: it is opened without waiting,
    and refused by its descriptor's type). `private`: also refused unless it belongs to this process's
    user and no one else may write it (a digest cache is trusted with what the fingerprint says)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SettingFileError(f"{path}: not a regular file")
        if private and (info.st_uid != os.geteuid() or info.st_mode & 0o022):
            raise SettingFileError(f"{path}: owned by another user or writable by others")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_setting_file(path: Path, max_bytes: int, private: bool = False) -> bytes:
    """The whole content of a regular file of at most `max_bytes` (see `open_regular`)."""
    with open_regular(path, private) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SettingFileError(f"{path}: larger than {max_bytes} bytes")
    return data


def descriptor_path(fd: int) -> str:
    """A name for an open descriptor that a decoder can open: it reaches the same open file (the
    same inode), whatever has happened to the file's name since."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else f"/dev/fd/{fd}"


class AllowedFiles:
    """Opens client-named files under `roots` (the operator's --allow-path directories)."""

    def __init__(self, roots: tuple[Path, ...]):
        # A root is matched as given (absolute) and as its real path; it is opened by its real path.
        # The roots themselves are the operator's: links in them are followed, once, here.
        pairs = []
        for root in roots:
            real = PurePosixPath(os.path.realpath(root))
            for form in {PurePosixPath(os.path.abspath(root)), real}:
                pairs.append((form.parts, str(real)))
        self._roots = sorted(pairs, key=lambda p: -len(p[0]))  # the longest (deepest) match first

    def _split(self, path: object, where: str) -> tuple[str, tuple[str, ...]]:
        if not self._roots:
            raise invalid(f"{where}: reading files is disabled (the operator allows directories with --allow-path)")
        if not isinstance(path, str) or not path:
            raise invalid(f"{where}: expected a non-empty path string")
        if "\x00" in path:
            raise invalid(f"{where}: the path contains a NUL character")
        if not path.startswith("/"):
            raise invalid(f"{where}: the path must be absolute")
        parts = PurePosixPath(path).parts
        if ".." in parts:
            raise invalid(f"{where}: '..' is not allowed in paths")
        for root_parts, real in self._roots:
            if parts[:len(root_parts)] == root_parts:
                rest = parts[len(root_parts):]
                if not rest:
                    raise invalid(f"{where}: not a regular file")
                return real, rest
        raise invalid(f"{where}: not under an allowed directory")

    def open(self, path: object, where: str, max_bytes: int, limit_name: str) -> int:
        """An open descriptor of a regular file of at most max_bytes; the caller closes it."""
        root, rest = self._split(path, where)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise input_error(f"{where}: the allowed directory cannot be opened") from None
        try:
            for name in rest[:-1]:
                fd = _step(fd, name, _DIR_FLAGS, where)
            fd = _step(fd, rest[-1], _FILE_FLAGS, where)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise invalid(f"{where}: not a regular file")
            if info.st_size > max_bytes:
                raise too_large(f"{where}: {info.st_size} bytes exceed the limit of {max_bytes} ({limit_name})")
            os.set_blocking(fd, True)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def read(self, path: object, where: str, max_bytes: int, limit_name: str) -> bytes:
        fd = self.open(path, where, max_bytes, limit_name)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since fstat
        if len(data) > max_bytes:
            raise too_large(f"{where}: more than {max_bytes} bytes ({limit_name})")
        return data

    @contextlib.contextmanager
    def opened(self, path: object, where: str, max_bytes: int, limit_name: str) -> Iterator[str]:
        """The checked file as a descriptor name (see `descriptor_path`), open while in the block."""
        fd = self.open(path, where, max_bytes, limit_name)
        try:
            yield descriptor_path(fd)
        finally:
            os.close(fd)


def _step(dir_fd: int, name: str, flags: int, where: str) -> int:
    """Open `name` in dir_fd without following a link; on success close dir_fd (the caller closes
    it on failure) and return the new descriptor."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY):
            raise invalid(f"{where}: a path component is a symbolic link or not a directory "
                          "(links are not followed)") from None
        if exc.errno == errno.ENOENT:
            raise input_error(f"{where}: no such file") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise input_error(f"{where}: permission denied") from None
        raise input_error(f"{where}: cannot open ({errno.errorcode.get(exc.errno, exc.errno)})") from None
    os.close(dir_fd)
    return fd
