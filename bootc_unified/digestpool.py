"""Userspace fs-verity digests of many files on every core, for repositories without fs-verity.

The digest hashes each 4 KiB block with its own hashlib call, and each call drops and retakes the
GIL: two threads doing that spend more time handing the GIL to each other than hashing (adding
/usr/share took 4.5 s with two threads, 2.8 s with one). So the digests are computed by worker
processes (`python -c`, reading batches of paths on stdin and answering on stdout), while the
caller's thread opens, links and reflinks. Workers only read; they never touch a repository.

Each digest comes with the identity of the file it was computed from (device, inode, size, mtime,
ctime): `FileDigest.matches` an fstat of the caller's own fd, or the caller must not use it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from typing import IO, NamedTuple

from bootc_unified.errors import UserError
from bootc_unified.verity import HashAlg, digest_fd

BATCH_FILES = 64  # paths per request: amortises the pipe round trip (~50 us) over many files
BATCH_BYTES = 8 << 20  # or fewer, when the caller knows their sizes, so work is spread evenly
IN_FLIGHT = 3  # requests queued per worker, so none waits for the caller
_LEN = struct.Struct("<I")


class FileDigest(NamedTuple):
    """A file's digest and the identity of the file it was computed from (a tuple: it crosses the
    pipe from the workers for each file, and tuples unpickle fastest)."""

    digest: bytes
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def matches(self, st: os.stat_result) -> bool:
        """Is `st` the file this digest was computed from, unchanged since?"""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        )


def digest_batch(paths: list[bytes], alg: HashAlg) -> list[FileDigest | None]:
    """The digest of each path that is a regular file it can read; None for any other (the caller
    meets the same problem on its own open and reports it)."""
    out: list[FileDigest | None] = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            out.append(None)
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                out.append(None)
                continue
            digest = digest_fd(fd, alg)
            after = os.fstat(fd)
            if (after.st_mtime_ns, after.st_ctime_ns, after.st_size) != (
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_size,
            ):
                out.append(None)  # changed while being read
                continue
            out.append(FileDigest(digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append(None)
        finally:
            os.close(fd)
    return out


def _send(pipe: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_LEN.pack(len(data)) + data)
    pipe.flush()


def _recv(pipe: IO[bytes]) -> object:
    head = pipe.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    data = pipe.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def worker_main() -> None:
    """The worker process: (algorithm label, paths) requests in, lists of FileDigest | None out,
    until its stdin closes (the caller is done, or died). Ctrl-C is the caller's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            request = _recv(stdin)
            assert isinstance(request, tuple)
            label, paths = request
            _send(stdout, digest_batch(list(paths), HashAlg.from_name(str(label))))
    except (EOFError, BrokenPipeError):
        return


def worker_count() -> int:
    """Worker processes to start: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0))


class _Worker:
    def __init__(self) -> None:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from bootc_unified.digestpool import worker_main; worker_main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()


class DigestPool:
    """Worker processes computing userspace fs-verity digests; use as a context manager."""

    def __init__(self, alg: HashAlg, workers: int | None = None) -> None:
        self.alg = alg
        self._workers: list[_Worker] = []
        try:
            for _ in range(workers or worker_count()):
                self._workers.append(_Worker())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DigestPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []

    def map(self, files: Iterable[tuple[bytes, int | None]]) -> Iterator[FileDigest | None]:
        """The digest of each (path, size if known) in order, the workers running ahead of the
        consumer by up to IN_FLIGHT batches each."""
        batches = _batches(files)
        pending: deque[_Worker] = deque()
        for turn, batch in enumerate(batches):
            worker = self._workers[turn % len(self._workers)]
            try:
                _send(worker.stdin, (self.alg.label, batch))
            except BrokenPipeError:
                raise UserError(f"digest worker process {worker.proc.pid} exited unexpectedly") from None
            pending.append(worker)
            if len(pending) >= IN_FLIGHT * len(self._workers):
                yield from self._result(pending.popleft())
        while pending:
            yield from self._result(pending.popleft())

    def _result(self, worker: _Worker) -> list[FileDigest | None]:
        try:
            result = _recv(worker.stdout)
        except EOFError:
            raise UserError(f"digest worker process {worker.proc.pid} exited unexpectedly") from None
        assert isinstance(result, list)
        return result


def _batches(files: Iterable[tuple[bytes, int | None]]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for path, known in files:
        batch.append(path)
        size += known or 0
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
