"""BLS type 1 entries on the ESP, bootc's names for them, and the kernel directories they point at.

    ESP/loader/entries/bootc_<os_id>-<version>-<prio>.conf     prio 1 = primary, 0 = secondary
        title <PRETTY_NAME>
        version <VERSION_ID>
        linux /EFI/Linux/bootc_composefs-<id>/vmlinuz
        initrd /EFI/Linux/bootc_composefs-<id>/initrd
        options root=UUID=... rw ... composefs=[?]<id>
        sort-key bootc-<os_id>-<0 primary | 1 secondary>
    ESP/EFI/Linux/bootc_composefs-<id>/{vmlinuz,initrd}

In the file name `-` in os_id becomes `_`; the sort-key keeps it. systemd-boot shows entries by
sort-key ascending, then version descending (bootc `BC/boot.rs`, `parsers/bls_config.rs`).
vfat has no symlinks: a kernel+initrd whose sha256 equals an existing kernel directory's is not
written again, the entry names that directory (which may carry another deployment's id).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified.boot.cmdline import ComposefsArg, parse_composefs, split_cmdline
from bootc_unified.deploy.sysroot import KERNEL_DIR_PREFIX, Esp
from bootc_unified.errors import UserError

PRIMARY, SECONDARY = 1, 0  # file-name priorities
KNOWN_KEYS = ("title", "version", "linux", "initrd", "options", "machine-id", "sort-key")


@dataclass(frozen=True)
class BlsEntry:
    title: str | None = None
    version: str | None = None
    linux: str | None = None
    initrd: tuple[str, ...] = ()
    options: str | None = None
    machine_id: str | None = None
    sort_key: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    def render(self) -> str:
        """Lines in bootc's order: title, version, linux, initrd..., options, machine-id, sort-key, extra."""
        lines: list[tuple[str, str | None]] = [
            ("title", self.title),
            ("version", self.version),
            ("linux", self.linux),
            *(("initrd", i) for i in self.initrd),
            ("options", self.options),
            ("machine-id", self.machine_id),
            ("sort-key", self.sort_key),
            *self.extra,
        ]
        return "".join(f"{k} {v}\n" for k, v in lines if v is not None)

    @classmethod
    def parse(cls, text: str, where: str = "BLS entry") -> BlsEntry:
        values: dict[str, str] = {}
        initrd: list[str] = []
        extra: list[tuple[str, str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition(" ")
            value = value.strip()
            if key == "initrd":
                initrd.append(value)
            elif key in KNOWN_KEYS:
                values[key] = value
            else:
                extra.append((key, value))
        return cls(
            title=values.get("title"),
            version=values.get("version"),
            linux=values.get("linux"),
            initrd=tuple(initrd),
            options=values.get("options"),
            machine_id=values.get("machine-id"),
            sort_key=values.get("sort-key"),
            extra=tuple(extra),
        )

    @property
    def composefs(self) -> ComposefsArg | None:
        return parse_composefs(split_cmdline(self.options or ""), "BLS options")

    @property
    def kernel_dir_name(self) -> str | None:
        """`bootc_composefs-<x>` of the `linux` path (x may be another deployment's id when shared)."""
        if self.linux is None:
            return None
        parts = Path(self.linux).parts
        return parts[-2] if len(parts) >= 2 and parts[-2].startswith(KERNEL_DIR_PREFIX) else None


def file_name(os_id: str, version: str, prio: int) -> str:
    return f"bootc_{os_id.replace('-', '_')}-{version}-{prio}.conf"


def sort_key(os_id: str, primary: bool) -> str:
    return f"bootc-{os_id}-{0 if primary else 1}"


@dataclass(frozen=True)
class EntryFile:
    path: Path
    entry: BlsEntry


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """A strverscmp-like key: digit runs compare as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|\D+", version)]


def _boot_order(a: EntryFile, b: EntryFile) -> int:
    """systemd-boot: entries with a sort-key first, by sort-key ascending, then machine-id, then
    version descending; then file name descending."""
    ka = (a.entry.sort_key is None, a.entry.sort_key or "", a.entry.machine_id or "")
    kb = (b.entry.sort_key is None, b.entry.sort_key or "", b.entry.machine_id or "")
    if ka != kb:
        return -1 if ka < kb else 1
    va, vb = _version_key(a.entry.version or ""), _version_key(b.entry.version or "")
    if va != vb:
        return -1 if va > vb else 1
    return -1 if a.path.name > b.path.name else (1 if a.path.name < b.path.name else 0)


def read_entries(directory: Path) -> list[EntryFile]:
    """The `*.conf` entries of a directory in boot-menu order (first = default)."""
    try:
        if not directory.is_dir():
            return []
        paths = [p for p in directory.iterdir() if p.name.endswith(".conf") and p.is_file()]
    except OSError as e:  # EIO: a FAT directory a power cut left unwritten (fsck.fat -a repairs it)
        raise UserError(
            f"{directory}: cannot read boot entries: {e.strerror or e} (the ESP needs `fsck.fat -a`, "
            "which bootc-unified-esp-fsck.service runs at boot)"
        ) from e
    out = []
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read BLS entry ({e})") from e
        out.append(EntryFile(path, BlsEntry.parse(text, str(path))))
    return sorted(out, key=functools.cmp_to_key(_boot_order))


def write_entry(directory: Path, name: str, entry: BlsEntry) -> Path:
    """Write an entry atomically (temporary file, fsync, rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(entry.render())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- kernel directories ---------------------------------------------------------------------------


def boot_digest(vmlinuz: Path, initrd: Path) -> str:
    """sha256 over the kernel's bytes, then the initrd's (the .origin `[boot] digest`)."""
    h = hashlib.sha256()
    for path in (vmlinuz, initrd):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def find_duplicate(esp: Esp, digest: str) -> Path | None:
    """An existing kernel dir whose vmlinuz+initrd hash to `digest`."""
    for d in esp.kernel_dirs():
        if (
            (d / "vmlinuz").is_file()
            and (d / "initrd").is_file()
            and boot_digest(d / "vmlinuz", d / "initrd") == digest
        ):
            return d
    return None


@dataclass(frozen=True)
class KernelDir:
    path: Path
    digest: str
    shared: bool  # an existing directory with the same bytes was reused
    created: bool  # this call wrote it

    @property
    def linux(self) -> str:
        return f"/EFI/Linux/{self.path.name}/vmlinuz"

    @property
    def initrd(self) -> str:
        return f"/EFI/Linux/{self.path.name}/initrd"


def install_kernel(esp: Esp, depl_id: str, vmlinuz: Path, initrd: Path) -> KernelDir:
    """ESP/EFI/Linux/bootc_composefs-<id>/{vmlinuz,initrd}, or the existing dir with equal bytes.

    Written into a temporary sibling and renamed into place, so a failure leaves no partial dir.
    """
    digest = boot_digest(vmlinuz, initrd)
    existing = find_duplicate(esp, digest)
    if existing is not None:
        return KernelDir(
            existing, digest, shared=existing.name != f"{KERNEL_DIR_PREFIX}{depl_id}", created=False
        )
    target = esp.kernel_dir(depl_id)
    if target.exists():
        raise UserError(f"{target}: exists with a different kernel or initrd")
    esp.linux.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=esp.linux))
    try:
        for src, name in ((vmlinuz, "vmlinuz"), (initrd, "initrd")):
            shutil.copyfile(src, tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        with contextlib.suppress(PermissionError):  # vfat refuses modes it cannot store
            os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the ESP is full: name it, not the file read
            raise UserError(f"{esp.linux}: cannot write {target.name}: {e.strerror}") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if boot_digest(target / "vmlinuz", target / "initrd") != digest:
        raise UserError(f"{target}: kernel or initrd changed while being copied")
    return KernelDir(target, digest, shared=False, created=True)
