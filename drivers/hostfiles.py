"""Ownership and modes of the files the node keeps for guests.

Guest data on the node (disks, config drives, volume files, backups) is
readable by root and, where QEMU must open it, by QEMU's group only:

- what QEMU opens (instance directories, disks, config drives, cached
  images): directories 0750 and files 0640, owned root:<QEMU group>. libvirt's
  DAC driver (`dynamic_ownership = 1`, the default) additionally chowns each
  disk of a starting domain to the QEMU user and gives the owner back when it
  stops (`remember_owner = 1`), so QEMU can write a root disk that is 0640.
  The group bits are what keep a read-only file (a config drive, a backing
  image) readable when an operator turns dynamic ownership off.
- what only root daemons open (volume files behind tgtd, backups):
  directories 0700, files 0600, root:root.

QEMU's user and group are libvirt's: `user` and `group` in qemu.conf, or the
defaults libvirt was built with, which qemu.conf shows as its commented-out
`#user = "..."` / `#group = "..."` lines (Debian: libvirt-qemu and
libvirt-qemu; the user's primary group is kvm, but QEMU runs with the group
qemu.conf names). The running libvirtd reports the same pair as the DAC base
label in its capabilities (`+64055:+64055` here), which a test compares.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

QEMU_CONF = "/etc/libvirt/qemu.conf"
GUEST_DIR_MODE = 0o750
GUEST_FILE_MODE = 0o640
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

_SETTING = re.compile(r'^(#?)(user|group)\s*=\s*"([^"]*)"\s*$')
# Distribution defaults, for a host without qemu.conf.
_FALLBACK_USERS = ("libvirt-qemu", "qemu")


@dataclass(frozen=True)
class QemuIdentity:
    """The user and group QEMU processes of the system libvirtd run as."""

    uid: int
    gid: int


def _uid(value: str) -> int | None:
    if value.startswith("+"):
        return int(value[1:]) if value[1:].isdigit() else None
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        return int(value) if value.isdigit() else None


def _gid(value: str) -> int | None:
    if value.startswith("+"):
        return int(value[1:]) if value[1:].isdigit() else None
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        return int(value) if value.isdigit() else None


def parse_qemu_conf(text: str) -> dict[str, str]:
    """`user` and `group` as libvirt sees them: a setting wins over the
    commented default (`#user = "..."`, written from the build's values)."""
    settings: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for line in text.splitlines():
        match = _SETTING.match(line.strip() if not line.startswith("#") else line)
        if match is None:
            continue
        commented, key, value = match.groups()
        (defaults if commented else settings)[key] = value
    return {**defaults, **settings}


def parse_dac_baselabel(label: str) -> QemuIdentity:
    """`+UID:+GID`, as libvirt's capabilities show the DAC base label."""
    user, _, group = label.strip().partition(":")
    return QemuIdentity(int(user.lstrip("+")), int(group.lstrip("+")))


def identity_from(conf: dict[str, str]) -> QemuIdentity:
    """Resolve qemu.conf's user and group to ids; without a group, the
    user's primary group (libvirt does the same)."""
    names = [conf["user"]] if "user" in conf else list(_FALLBACK_USERS)
    uid = None
    for name in names:
        uid = _uid(name)
        if uid is not None:
            break
    if uid is None:
        return QemuIdentity(0, 0)  # no QEMU user on this host: root only
    gid = _gid(conf["group"]) if "group" in conf else None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = 0
    return QemuIdentity(uid, gid)


@functools.cache
def qemu_identity(conf_path: str = QEMU_CONF) -> QemuIdentity:
    try:
        text = Path(conf_path).read_text()
    except OSError:
        text = ""
    return identity_from(parse_qemu_conf(text))


def _own(path: str | os.PathLike[str], gid: int, mode: int) -> None:
    # Only root can give a file to root:<group>; unprivileged runs (unit
    # tests) keep their own ownership and still get the mode.
    if os.geteuid() == 0:
        os.chown(path, 0, gid, follow_symlinks=False)
    os.chmod(path, mode)


def guest_dir(path: str | os.PathLike[str]) -> None:
    """A directory QEMU traverses: 0750 root:<QEMU group>."""
    _own(path, qemu_identity().gid, GUEST_DIR_MODE)


def guest_file(path: str | os.PathLike[str]) -> None:
    """A file QEMU opens: 0640 root:<QEMU group> (libvirt lends it to QEMU's
    user while a domain runs)."""
    _own(path, qemu_identity().gid, GUEST_FILE_MODE)


def private_dir(path: str | os.PathLike[str]) -> None:
    """A directory only root daemons use: 0700 root:root."""
    _own(path, 0, PRIVATE_DIR_MODE)


def private_file(path: str | os.PathLike[str]) -> None:
    """A file only root daemons use: 0600 root:root."""
    _own(path, 0, PRIVATE_FILE_MODE)


def make_guest_dir(path: str | os.PathLike[str]) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    guest_dir(path)


def make_private_dir(path: str | os.PathLike[str]) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    private_dir(path)
