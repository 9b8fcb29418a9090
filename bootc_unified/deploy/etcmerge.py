"""bootc's /etc 3-way merge (bootc `crates/etc-merge/src/lib.rs`, reference/deployments.md section 6).

    pristine = the booted image's /etc (from its mounted EROFS image)
    current  = the live /etc (the booted deployment's state/deploy/<id>/etc)
    new      = the staged deployment's state/deploy/<new>/etc (a fresh copy of the new image's /etc)

Directories, regular files and symlinks are compared (sockets, fifos and devices are ignored) by
type, mode, uid, gid, all xattrs, content (sha256) and symlink target; mtime is ignored.

    added    = in current, not in pristine
    modified = in both, anything above differs
    removed  = in pristine, not in current

Unmergeable: an added or modified path that is a directory in current and a non-directory in new,
or the reverse. `diff()` finds them; the caller refuses before anything is staged.

`apply()` writes the local changes into new: added then modified paths take current's object
(content copied, symlink recreated, mode, owner and xattrs copied; a directory is created if absent,
else only its metadata set), removed paths are deleted. Local changes win; files nobody touched
keep the new image's version. Applying twice gives the same tree (finalize may be interrupted).
Unlike bootc, content is always compared by sha256 (never by fs-verity digest).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bootc_unified.errors import UserError

DIR, FILE, SYMLINK = "dir", "file", "symlink"


@dataclass(frozen=True)
class Meta:
    kind: str  # DIR, FILE or SYMLINK
    mode: int  # permission bits (S_IMODE)
    uid: int
    gid: int
    xattrs: tuple[tuple[str, bytes], ...]
    content: str  # sha256 hex of a file, the target of a symlink, "" for a directory


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue  # vanished or unreadable (e.g. a trusted.* name without privilege)
    return tuple(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def meta_of(path: Path) -> Meta | None:
    """The compared metadata of one path, or None for a type the merge ignores (or a missing path)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        kind, content = DIR, ""
    elif stat.S_ISREG(st.st_mode):
        kind, content = FILE, _sha256(path)
    elif stat.S_ISLNK(st.st_mode):
        kind, content = SYMLINK, os.readlink(path)
    else:
        return None
    return Meta(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _xattrs(path), content)


def scan(root: Path) -> dict[str, Meta]:
    """Every directory, regular file and symlink under `root` (not `root` itself), by relative path."""
    if not root.is_dir():
        return {}
    out: dict[str, Meta] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            base = Path(dirpath)
            for name in sorted(dirnames + filenames):
                path = base / name
                meta = meta_of(path)
                if meta is not None:
                    out[str(path.relative_to(root))] = meta
    except OSError as e:
        raise UserError(f"{e.filename or root}: cannot read ({e.strerror})") from e
    return out


def _raise(e: OSError) -> None:
    raise e


@dataclass
class EtcDiff:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unmergeable: list[str] = field(default_factory=list)

    def render(self) -> str:
        """bootc config-diff's layout: one `Added/Modified/Removed/Unmergable: path` line each."""
        lines = [f"Added: {p}" for p in self.added]
        lines += [f"Modified: {p}" for p in self.modified]
        lines += [f"Removed: {p}" for p in self.removed]
        lines += [f"Unmergable: {p}" for p in self.unmergeable]
        return "".join(line + "\n" for line in lines)


def _is_dir(meta: Meta | None) -> bool:
    return meta is not None and meta.kind == DIR


def diff(pristine: Path, current: Path, new: Path) -> EtcDiff:
    """The local changes (pristine -> current) and the ones that cannot be applied onto `new`."""
    p, c, n = scan(pristine), scan(current), scan(new)
    out = EtcDiff()
    for path in sorted(c):
        if path not in p:
            out.added.append(path)
        elif p[path] != c[path]:
            out.modified.append(path)
    out.removed = sorted(path for path in p if path not in c)
    for path in [*out.added, *out.modified]:
        other = n.get(path)
        if other is not None and _is_dir(c[path]) != _is_dir(other):
            out.unmergeable.append(path)
    out.unmergeable.sort()
    return out


def check_mergeable(pristine: Path, current: Path, new: Path) -> EtcDiff:
    """`diff()`, or a one-line UserError naming the first unmergeable path."""
    d = diff(pristine, current, new)
    if d.unmergeable:
        more = f" (and {len(d.unmergeable) - 1} more)" if len(d.unmergeable) > 1 else ""
        first = d.unmergeable[0]
        raise UserError(
            f"Merge conflicts found in etc: /etc/{first} is a "
            f"{'directory' if _is_dir(meta_of(current / first)) else 'non-directory'} locally and "
            f"{'a directory' if _is_dir(meta_of(new / first)) else 'not a directory'} in the new image{more}"
        )
    return d


def _copy_meta(src: Path, dest: Path, meta: Meta) -> None:
    os.chown(dest, meta.uid, meta.gid, follow_symlinks=False)
    if meta.kind != SYMLINK:
        os.chmod(dest, meta.mode)
    have = {name for name, _ in _xattrs(dest)}
    want = dict(meta.xattrs)
    for name in have - set(want):
        os.removexattr(dest, name, follow_symlinks=False)
    for name, value in want.items():
        os.setxattr(dest, name, value, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _ensure_parents(current: Path, new: Path, rel: Path) -> None:
    """Create `rel`'s missing parent directories in `new`, with current's metadata."""
    for parent in reversed(rel.parents[:-1]):  # outermost first, without "."
        dest = new / parent
        if not dest.exists():
            meta = meta_of(current / parent)
            dest.mkdir()
            if meta is not None and meta.kind == DIR:
                _copy_meta(current / parent, dest, meta)


def _place(current: Path, new: Path, rel: str) -> None:
    src, dest = current / rel, new / rel
    meta = meta_of(src)
    if meta is None:
        return
    _ensure_parents(current, new, Path(rel))
    if meta.kind == DIR:
        if not (dest.is_dir() and not dest.is_symlink()):
            if dest.is_symlink() or dest.exists():
                _remove(dest)
            dest.mkdir()
    else:
        if dest.is_symlink() or dest.exists():
            _remove(dest)
        if meta.kind == SYMLINK:
            os.symlink(meta.content, dest)
        else:
            shutil.copyfile(src, dest, follow_symlinks=False)
    _copy_meta(src, dest, meta)


def apply(pristine: Path, current: Path, new: Path) -> EtcDiff:
    """Merge the local changes into `new` (refusing unmergeable trees first); returns the diff."""
    d = check_mergeable(pristine, current, new)
    try:
        for rel in [*d.added, *d.modified]:  # sorted: parents come before their entries
            _place(current, new, rel)
        for rel in d.removed:
            _remove(new / rel)
    except OSError as e:
        raise UserError(f"/etc merge into {new}: {e.filename or ''}: {e.strerror}") from e
    return d
