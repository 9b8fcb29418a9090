"""fs-verity: the userspace digest, and enable/measure through the kernel's ioctls.

The digest is the one `fsverity digest` prints: a Merkle tree over 4096-byte blocks with no
salt, summarised by hashing a 256-byte descriptor. Object IDs of the composefs repository are
these digests.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 12

FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686

# Chunk size for reads: a multiple of the block size, large enough that syscalls don't matter.
_READ_CHUNK = 1 << 20


class HashAlg(enum.Enum):
    SHA256 = ("sha256", 1, 32)
    SHA512 = ("sha512", 2, 64)

    def __init__(self, label: str, kernel_id: int, size: int) -> None:
        self.label = label
        self.kernel_id = kernel_id
        self.size = size

    @classmethod
    def from_name(cls, name: str) -> HashAlg:
        for alg in cls:
            if alg.label == name:
                return alg
        raise ValueError(f"unknown fs-verity hash algorithm {name!r} (use sha256 or sha512)")

    @classmethod
    def from_kernel_id(cls, kernel_id: int) -> HashAlg:
        for alg in cls:
            if alg.kernel_id == kernel_id:
                return alg
        raise ValueError(f"unknown fs-verity hash algorithm id {kernel_id}")

    def hasher(self) -> Callable[[bytes | bytearray | memoryview], hashlib._Hash]:
        return hashlib.sha256 if self is HashAlg.SHA256 else hashlib.sha512


class _Tree:
    """Incremental Merkle tree: feed data blocks, get the root hash."""

    def __init__(self, alg: HashAlg) -> None:
        self._h = alg.hasher()
        self._digest_size = alg.size
        self._per_block = BLOCK_SIZE // alg.size
        # levels[i] holds the concatenated hashes of level i not yet folded into level i+1.
        self._levels: list[bytearray] = [bytearray()]

    def add_hash(self, level: int, digest: bytes) -> None:
        while True:
            if level == len(self._levels):
                self._levels.append(bytearray())
            buf = self._levels[level]
            buf += digest
            if len(buf) < BLOCK_SIZE:
                return
            digest = self._h(buf).digest()
            buf.clear()
            level += 1

    def add_level0(self, hashes: bytes) -> None:
        """Concatenated hashes of consecutive data blocks (level 0), folded a full block at a time."""
        buf = self._levels[0]
        buf += hashes
        full = len(buf) - len(buf) % BLOCK_SIZE
        if not full:
            return
        view = memoryview(buf)
        try:
            for off in range(0, full, BLOCK_SIZE):
                self.add_hash(1, self._h(view[off : off + BLOCK_SIZE]).digest())
        finally:
            view.release()
        del buf[:full]

    def add_data_block(self, block: bytes | memoryview) -> None:
        self.add_hash(0, self._h(block).digest())

    def root(self, data_size: int) -> bytes:
        if data_size == 0:
            return bytes(self._digest_size)
        level = 0
        while True:
            buf = self._levels[level]
            if level + 1 == len(self._levels):  # the top level: it holds at least one hash
                if len(buf) == self._digest_size:
                    return bytes(buf)
                return self._h(bytes(buf).ljust(BLOCK_SIZE, b"\0")).digest()
            if buf:
                padded = bytes(buf).ljust(BLOCK_SIZE, b"\0")
                buf.clear()
                self.add_hash(level + 1, self._h(padded).digest())
            level += 1


def descriptor(alg: HashAlg, data_size: int, root_hash: bytes) -> bytes:
    """The 256-byte fsverity_descriptor whose hash is the file's digest."""
    return struct.pack(
        "<BBBBIQ64s32s144s",
        1,
        alg.kernel_id,
        LOG_BLOCK_SIZE,
        0,
        0,
        data_size,
        root_hash.ljust(64, b"\0"),
        b"",
        b"",
    )


def _finish(alg: HashAlg, tree: _Tree, size: int) -> bytes:
    return alg.hasher()(descriptor(alg, size, tree.root(size))).digest()


def digest_bytes(data: bytes, alg: HashAlg = HashAlg.SHA512) -> bytes:
    return _digest_chunks([data] if data else [], alg)


def _digest_chunks(chunks: Iterable[bytes], alg: HashAlg) -> bytes:
    """Digest data arriving in chunks whose sizes are multiples of BLOCK_SIZE (the last may not be)."""
    digester = Digester(alg)
    for chunk in chunks:
        digester.update(chunk)
    return digester.finish()


class Digester:
    """The digest of data fed in pieces of any size (whole blocks are hashed straight from them)."""

    def __init__(self, alg: HashAlg) -> None:
        self.alg = alg
        self._tree = _Tree(alg)
        self._h = alg.hasher()
        self._pending = b""
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._pending:
            chunk = self._pending + bytes(chunk)
            self._pending = b""
        view = memoryview(chunk)
        size_full = len(view) - len(view) % BLOCK_SIZE
        h = self._h
        self._tree.add_level0(
            b"".join([h(view[o : o + BLOCK_SIZE]).digest() for o in range(0, size_full, BLOCK_SIZE)])
        )
        if size_full < len(view):
            self._pending = bytes(view[size_full:])
        self.size += size_full

    def finish(self) -> bytes:
        size = self.size
        if self._pending:
            size += len(self._pending)
            self._tree.add_data_block(self._pending.ljust(BLOCK_SIZE, b"\0"))
        return _finish(self.alg, self._tree, size)


def _pread_chunks(fd: int) -> Iterator[bytes]:
    offset = 0
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def digest_fd(fd: int, alg: HashAlg = HashAlg.SHA512) -> bytes:
    """Digest an open file from offset 0 with pread (the fd's position is left alone)."""
    return _digest_chunks(_pread_chunks(fd), alg)


def digest_file(path: str | os.PathLike[str], alg: HashAlg = HashAlg.SHA512) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, alg)
    finally:
        os.close(fd)


# --- kernel interface -------------------------------------------------------------------------


class VerityUnsupported(Exception):
    """The kernel or the filesystem holding the file has no fs-verity."""


@dataclass(frozen=True)
class Support:
    supported: bool
    reason: str


def enable(fd: int, alg: HashAlg = HashAlg.SHA512) -> bool:
    """Enable fs-verity on a file opened read-only with no writers.

    Returns True if this call enabled it, False if it was already enabled. Raises
    VerityUnsupported where the kernel or filesystem cannot, OSError for anything else
    (ETXTBSY: a writer still has the file open).
    """
    arg = struct.pack("<IIIIQIIQ88s", 1, alg.kernel_id, BLOCK_SIZE, 0, 0, 0, 0, 0, b"")
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
            raise VerityUnsupported(os.strerror(e.errno)) from e
        raise
    return True


def measure(fd: int) -> tuple[HashAlg, bytes] | None:
    """The kernel's digest of a verity file, or None if verity is not enabled on it."""
    buf = bytearray(struct.pack("<HH", 0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
            raise VerityUnsupported(os.strerror(e.errno)) from e
        raise
    alg_id, size = struct.unpack_from("<HH", buf)
    return HashAlg.from_kernel_id(alg_id), bytes(buf[4 : 4 + size])


def probe(directory: str | os.PathLike[str]) -> Support:
    """Can fs-verity be enabled on new files in `directory`? Leaves nothing behind."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        return Support(False, f"cannot create a temporary file there: {e.strerror}")
    try:
        os.write(fd, b"probe")
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        os.close(fd)
        fd = ro
        enable(fd, HashAlg.SHA256)
    except VerityUnsupported as e:
        return Support(False, f"fs-verity is not available on this filesystem or kernel ({e})")
    except OSError as e:
        return Support(False, f"fs-verity could not be enabled on a probe file ({e.strerror})")
    finally:
        os.close(fd)
    return Support(True, "fs-verity enabled on a probe file")
