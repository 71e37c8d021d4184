"""Run code inside a named network namespace (`/run/netns/<name>`, as `ip netns add` creates them).

Netlink sockets (libnftables' included) bind to the network namespace that is current for the *thread*
that opens them, so the safe way to talk to another namespace from one process is a dedicated thread
that has `setns()`'d into it once and does all the work there (`NetnsThread`). `setns(CLONE_NEWNET)`
changes only the calling thread, never the rest of the process.

Safety: `assert_not_initial()` refuses to let a writer program the namespace this process started in
(or pid 1's), unless the caller explicitly allows it (a real agent on a real host).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_INITIAL_NETNS_INO = os.stat("/proc/self/ns/net").st_ino  # the namespace this process started in


class NetnsError(RuntimeError):
    pass


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"netns: invalid namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def netns_inode(name: str | None) -> int:
    """Inode of a named namespace, or of the calling thread's current one when `name` is None."""
    if name is None:
        return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
    return os.stat(netns_path(name)).st_ino


def initial_netns_inodes() -> set[int]:
    """The namespaces we must never write to by accident: ours at start, and pid 1's if visible."""
    inodes = {_INITIAL_NETNS_INO}
    with contextlib.suppress(OSError):
        inodes.add(os.stat("/proc/1/ns/net").st_ino)
    return inodes


def assert_not_initial(what: str) -> None:
    """Raise unless the calling thread is in a namespace other than the initial/root one."""
    ino = netns_inode(None)
    if ino in initial_netns_inodes():
        raise NetnsError(f"{what}: refusing to write to the initial network namespace (inode {ino})")


def _setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Switch the calling thread into namespace `name` for the block (None: stay where we are)."""
    if name is None:
        yield
        return
    back = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(netns_path(name), os.O_RDONLY)
    try:
        _setns_fd(target)
        try:
            yield
        finally:
            _setns_fd(back)
    finally:
        os.close(target)
        os.close(back)


class NetnsThread:
    """A worker thread living in one network namespace; `call(fn, ...)` runs fn there and returns.

    Everything that opens netlink sockets for that namespace (libnftables context, conntrack, NFLOG)
    is created and used on this thread, so no socket can ever be (re)opened in the wrong namespace.
    """

    def __init__(self, netns: str | None, name: str = "netns") -> None:
        self.netns = netns
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._ready: Future[int] = Future()
        self._thread = threading.Thread(target=self._run, name=f"{name}:{netns or '-'}", daemon=True)
        self._thread.start()
        self.inode = self._ready.result()

    def _run(self) -> None:
        try:
            if self.netns is not None:
                fd = os.open(netns_path(self.netns), os.O_RDONLY)
                try:
                    _setns_fd(fd)
                finally:
                    os.close(fd)
            self._ready.set_result(netns_inode(None))
        except BaseException as e:  # report to the constructor, then end the thread
            self._ready.set_exception(e)
            return
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        if not self._thread.is_alive():
            raise NetnsError(f"netns thread for {self.netns!r} is not running")
        fut: Future[T] = Future()
        self._q.put((lambda: fn(*args, **kwargs), fut))
        return fut.result()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Queue fn on the thread and return at once (work after the caller's critical path)."""
        if not self._thread.is_alive():
            raise NetnsError(f"netns thread for {self.netns!r} is not running")
        fut: Future[T] = Future()
        self._q.put((lambda: fn(*args, **kwargs), fut))
        return fut

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=5)


def exec_argv(netns: str | None, argv: list[str]) -> list[str]:
    """argv that runs a command inside `netns` (for tools like conntrack, ping, nc in tests and the lab)."""
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


def run(netns: str | None, argv: list[str], *, check: bool = True, timeout: float = 10.0) -> str:
    res = subprocess.run(exec_argv(netns, argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} in {netns}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


__all__ = [
    "NetnsError",
    "NetnsThread",
    "assert_not_initial",
    "exec_argv",
    "in_netns",
    "initial_netns_inodes",
    "netns_inode",
    "netns_path",
    "run",
]
