"""What the server's OS user can reach: its binaries (copied where it can read them if not), data and socket dirs.

As root the servers run as an unprivileged user, who cannot read a checkout under a 0700 directory
(/root/..., a private home): the binaries are then copied once into a shared cache, <tmp>/tiered-cache-bin-<uid>/<digest>,
owned by us, mode 0755, named by a digest of their content and made by an atomic rename, so parallel
test processes agree on one copy and a changed wheel gets a new one.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import pwd
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_CACHE_NAME = "tiered-cache-bin"
_LAYOUT = b"1"  # part of every digest: bump when the copy's layout changes
_SOCKET_BASE_MAX = 60  # a unix socket path must fit sun_path (108 bytes) with PostgreSQL's own suffix
_R, _W, _X = 4, 2, 1
_private_copies: dict[str, Path] = {}
_copy_lock = threading.Lock()


def _groups(user: pwd.struct_passwd) -> set[int]:
    """Every group user is in, for the group permission bits."""
    return {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}


def _allowed(st: os.stat_result, user: pwd.struct_passwd, groups: set[int], want: int) -> bool:
    """Whether the mode bits grant user all of want (r/w/x), checked as the kernel does: owner, else group, else other."""
    if st.st_uid == user.pw_uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def blocked_component(path: Path, user: pwd.struct_passwd) -> Path | None:
    """First directory on the way to path (path included) that user cannot traverse (mode bits only)."""
    groups = _groups(user)
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except OSError:
            return d
        if stat.S_ISDIR(st.st_mode) and not _allowed(st, user, groups, _X):
            return d
    return None


def _walk(paths: list[Path]) -> Iterator[Path]:
    """Every path under paths (dirs first, sorted), following symlinks as the server would."""
    for top in paths:
        yield top
        if top.is_dir():
            for root, dirs, files in os.walk(top, followlinks=True):
                dirs.sort()
                for name in [*dirs, *sorted(files)]:
                    yield Path(root, name)


def unreadable(paths: list[Path], user: pwd.struct_passwd) -> Path | None:
    """First of paths, or of the files under them, that user cannot reach, list, read or (if executable) run."""
    groups = _groups(user)
    for top in paths:
        blocked = blocked_component(top, user)
        if blocked is not None:
            return blocked
    for p in _walk(paths):
        try:
            st = p.stat()
        except OSError:
            return p
        if stat.S_ISDIR(st.st_mode):
            want = _R | _X
        else:
            want = _R | (_X if st.st_mode & stat.S_IXUSR else 0)
        if not _allowed(st, user, groups, want):
            return p
    return None


def base_dir(user: pwd.struct_passwd | None) -> Path:
    """A short temp dir the server's user can traverse: TMPDIR's when it can, else /tmp, /var/tmp or /dev/shm."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        p = Path(candidate)
        if len(candidate) > _SOCKET_BASE_MAX or not p.is_dir():
            continue
        if user is None or blocked_component(p, user) is None:
            return p
    who = f" that user {user.pw_name!r} can reach" if user is not None else ""
    raise RuntimeError(f"No temp directory{who} (tried TMPDIR, /tmp, /var/tmp, /dev/shm); set TMPDIR to one.")


def make_tempdir(prefix: str, user: pwd.struct_passwd | None) -> Path:
    """A private temp dir for one server (data, socket, log), owned by the user the server runs as."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir(user)))
    if user is not None:
        os.chown(d, user.pw_uid, user.pw_gid)
        blocked = blocked_component(d, user)
        if blocked is not None:
            shutil.rmtree(d, ignore_errors=True)
            raise RuntimeError(f"User {user.pw_name!r} cannot reach the server's directory {d}: {blocked} is closed.")
    return d


def _tree_digest(anchor: Path, paths: tuple[Path, ...]) -> str:
    """Content digest of the tree (relative names, exec bits, bytes), naming its copy in the cache."""
    h = hashlib.blake2b(_LAYOUT, digest_size=12)
    for p in _walk(list(paths)):
        rel = str(p.relative_to(anchor)).encode()
        if p.is_dir():
            h.update(b"d\0" + rel + b"\0")
            continue
        h.update(b"f\0" + rel + (b"\0x\0" if p.stat().st_mode & stat.S_IXUSR else b"\0-\0"))
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


_digest = functools.lru_cache(maxsize=16)(_tree_digest)  # of a source tree: hashed once per process
_verified: set[Path] = set()  # copies this process has checked or made


def _intact(final: Path, anchor: Path, paths: tuple[Path, ...], digest: str) -> bool:
    """Whether a copy in the cache still has the content its name says (checked once per process)."""
    if final not in _verified:
        try:
            ok = _tree_digest(final, tuple(final / p.relative_to(anchor) for p in paths)) == digest
        except OSError:  # a file gone from under the walk
            ok = False
        if not ok:
            return False
        _verified.add(final)
    return True


def _copy_into(anchor: Path, paths: tuple[Path, ...], dest: Path) -> None:
    """Copy paths to dest at their places relative to anchor, readable by everyone, symlinks resolved."""
    for p in paths:
        target = dest / p.relative_to(anchor)
        target.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, target)
    for q in _walk([dest]):
        if q.is_dir():
            os.chmod(q, 0o755)
        else:
            os.chmod(q, 0o755 if os.stat(q).st_mode & stat.S_IXUSR else 0o644)


def _shared_cache(base: Path) -> Path | None:
    """<base>/tiered-cache-bin-<uid>, a dir of ours that only we can write; None if someone else holds the name."""
    parent = base / f"{_CACHE_NAME}-{os.geteuid()}"
    try:
        parent.mkdir(mode=0o755)
    except FileExistsError:
        pass
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return None
    if stat.S_IMODE(st.st_mode) != 0o755:  # umask on mkdir, or a racing process not at its chmod yet
        os.chmod(parent, 0o755)
    return parent


def _private_copy(anchor: Path, paths: tuple[Path, ...], base: Path, digest: str) -> Path:
    """Fallback when the shared cache name is taken by another user: a copy of this process, removed at exit."""
    with _copy_lock:
        if digest not in _private_copies:
            d = Path(tempfile.mkdtemp(prefix=f"{_CACHE_NAME}-", dir=base))
            atexit.register(shutil.rmtree, d, True)
            _copy_into(anchor, paths, d)
            _private_copies[digest] = d
        return _private_copies[digest]


def _discard(d: Path, cache: Path) -> None:
    """Move a damaged copy out of the way atomically (processes running from it keep their open files), then delete."""
    aside = Path(tempfile.mkdtemp(prefix=".damaged-", dir=cache))
    try:
        os.rename(d, aside / "copy")
    except FileNotFoundError:  # another process moved it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _cached_copy(anchor: Path, paths: tuple[Path, ...], user: pwd.struct_passwd) -> Path:
    """The copy's anchor in the shared cache: made once (staged, then renamed into place), checked once per process."""
    digest = _digest(anchor, paths)
    base = base_dir(user)
    cache = _shared_cache(base)
    if cache is None:
        return _private_copy(anchor, paths, base, digest)
    final = cache / digest
    if final.is_dir() and not _intact(final, anchor, paths, digest):
        _discard(final, cache)  # damaged since (a temp cleaner aging files out of /tmp): make it again
    if not final.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache))
        try:
            _copy_into(anchor, paths, staging)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # not "another process renamed first": a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _verified.add(final)
    return final


def placed(anchor: Path, paths: list[Path], user: pwd.struct_passwd | None) -> Path:
    """The anchor to run paths from: the original when user can use them (or no switch is needed), else a copy."""
    if user is None or unreadable(paths, user) is None:
        return anchor
    copied = _cached_copy(anchor, tuple(paths), user)
    moved = [copied / p.relative_to(anchor) for p in paths]
    still = unreadable(moved, user)
    if still is not None:
        raise RuntimeError(f"Copied the server binaries to {copied}, but user {user.pw_name!r} cannot read {still}.")
    return copied
