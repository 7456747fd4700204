"""Claiming and releasing a Unix socket path safely (SPEC §6), for every socket we listen on.

A socket file outlives its server when the process is killed, so a new server must be able to
replace a *stale* one; but a path where another server still accepts connections is that
server's, and taking it over leaves it running unreachable (and when it stops it would delete
ours). So:

- :func:`claim_unix_socket` creates the directory (0750 when it creates it), and binds a new
  listening socket (0660) at the path. Something that is not a socket is never deleted (the
  claim fails with a clear error); a socket that accepts connections is live and is never taken
  over (the claim fails); only a socket nobody accepts on is removed and replaced.
- :meth:`ClaimedSocket.release` removes the file only if it is still the one we bound (same
  device, inode and change time), so a server never deletes a successor's socket.

Two servers starting at once on one path cannot both win: the probe, the replacement and the
bind happen under an exclusive ``flock`` of the socket's directory, and ``bind`` itself fails
when the path exists. The listening socket is handed to asyncio as ``sock=`` (not ``path=``):
``loop.create_unix_server(path=...)`` deletes any socket already at the path, and on Python
3.13 it also unlinks the file when the server closes (``cleanup_socket``); with ``sock=`` the
file is ours alone to remove, on every supported Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Iterator

log = logging.getLogger("deviceapi.socket")

#: Mode of the socket file (owner and group may connect).
SOCKET_MODE = 0o660
#: Mode of a directory we create for the socket (an existing one keeps the operator's mode).
DIRECTORY_MODE = 0o750
#: Attempts to bind when the path keeps reappearing between the probe and the bind.
_ATTEMPTS = 3


class SocketPathError(RuntimeError):
    """The Unix socket path is unusable: not a socket, in use by a live server, not writable."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    """What tells our socket file from a successor's at the same path (inode numbers alone
    are reused at once on tmpfs and ext4)."""

    device: int
    inode: int
    changed_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> _Identity:
        return cls(info.st_dev, info.st_ino, info.st_ctime_ns)


class ClaimedSocket:
    """A bound, listening Unix socket at ``path``, and the right to remove that path later.

    ``sock`` goes to the server (``Server.start(sock=...)``), which then owns closing it;
    :meth:`release` removes the file if it is still ours. :meth:`close` does both, for a claim
    that was never handed over."""

    def __init__(self, path: str, sock: socket.socket, identity: _Identity) -> None:
        self.path = path
        self.sock = sock
        self._identity = identity
        self._released = False

    def is_ours(self) -> bool:
        """Whether the file at ``path`` is still the socket we bound."""
        try:
            return _Identity.of(os.lstat(self.path)) == self._identity
        except FileNotFoundError:
            return False

    def release(self) -> bool:
        """Remove the socket file if it is still ours; idempotent. True when it removed it.

        Under the directory lock, so a server claiming the path at the same moment either
        sees our file (and finds it stale or live) or none — never loses its new file to us."""
        if self._released:
            return False
        self._released = True
        with _directory_lock(os.path.dirname(self.path) or "."):
            if not self.is_ours():
                if os.path.lexists(self.path):
                    log.warning("socket path now belongs to someone else; leaving it",
                                extra={"peer": self.path})
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        return True

    def close(self) -> None:
        """Close the socket and release the path (a claim whose server never started)."""
        self.sock.close()
        self.release()


def claim_unix_socket(path: str, *, flag: str = "--unix-socket", backlog: int = 128,
                      mode: int = SOCKET_MODE) -> ClaimedSocket:
    """Bind and listen at ``path``, replacing only a stale socket; raise SocketPathError
    (naming ``flag``, one line an operator can act on) when the path is not ours to take."""
    directory = os.path.dirname(path) or "."
    _make_directory(directory, path, flag)
    with _directory_lock(directory):
        for _ in range(_ATTEMPTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise SocketPathError(f"{flag} {path}: cannot bind: {exc.strerror}"
                                          ) from None
                _clear_stale(path, flag)
                continue
            try:
                os.chmod(path, mode)
                identity = _Identity.of(os.lstat(path))
                sock.listen(backlog)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            return ClaimedSocket(path, sock, identity)
    raise SocketPathError(f"{flag} {path}: the path keeps being re-created by someone else")


def prepare_socket_path(path: str, flag: str = "--unix-socket") -> None:
    """Create the directory and clear a stale socket, without binding (for code that binds by
    path itself). Prefer :func:`claim_unix_socket`: binding by path through asyncio deletes
    any socket that appears in between."""
    directory = os.path.dirname(path) or "."
    _make_directory(directory, path, flag)
    with _directory_lock(directory):
        _clear_stale(path, flag)


def _make_directory(directory: str, path: str, flag: str) -> None:
    """Create the socket's directory 0750; an existing one is the operator's (it may be /run
    or /tmp), so its mode is left alone."""
    try:
        os.makedirs(directory, mode=DIRECTORY_MODE)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise SocketPathError(
                f"{flag} {path}: {directory} exists and is not a directory") from None
    except NotADirectoryError:
        raise SocketPathError(
            f"{flag} {path}: a parent of {directory} is not a directory") from None
    else:
        os.chmod(directory, DIRECTORY_MODE)  # makedirs' mode went through the umask


def _clear_stale(path: str, flag: str) -> None:
    """Remove the socket at ``path`` if nobody accepts on it; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(
            f"{flag} {path} exists and is a {_kind(info.st_mode)}, not a socket; "
            "refusing to replace it")
    if _accepts(path, flag):
        raise SocketPathError(
            f"{flag} {path} is in use: another server accepts connections on it; refusing "
            "to take it over (stop that server or choose another path)")
    log.info("removing stale socket", extra={"reason": path})
    with contextlib.suppress(FileNotFoundError):
        if _Identity.of(os.lstat(path)) == _Identity.of(info):
            os.unlink(path)


def _accepts(path: str, flag: str) -> bool:
    """Whether a server listens at ``path`` (a non-blocking connect, closed at once)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # listening, with a full accept queue: alive
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except PermissionError:
        raise SocketPathError(
            f"{flag} {path}: permission denied connecting to the existing socket, so "
            "whether a server uses it is unknown; refusing to replace it") from None
    finally:
        probe.close()
    return True


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    """An exclusive ``flock`` on the socket's directory while a path is claimed or released
    (held for microseconds). Without read access to the directory, no lock: bind still
    refuses an existing path, so only the stale-replacement race stays open."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    return "regular file" if stat.S_ISREG(mode) else "special file"
