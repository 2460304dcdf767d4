"""The image store (Glance's filesystem store): imports image data once,
verified and inspected, and keeps it for nodes to copy into their caches.

Import order matters: checksum first (the bytes are what the user promised),
then the pure-Python header inspection (format, backing file, data file,
encryption), then a qemu-img cross-check with the format always explicit.
Nothing is stored unless every step passed.

Two kinds of source: a tenant's URL, fetched under the operator's
`FetchPolicy` (nubes.drivers.images.fetch), and a store-internal reference
(`snapshots/UID.qcow2`, `transfers/UID.qcow2`, `shelved/UID.qcow2`) that node
agents write and nobody else can name: snapshots and shelved disks never
travel through a URL a user could have written.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from nubes.drivers.hostfiles import make_private_dir, private_file
from nubes.drivers.images.cache import ChecksumMismatch, ImageRejected, sha256_file
from nubes.drivers.images.fetch import FetchPolicy, fetch
from nubes.drivers.images.inspect import ImageInspectionError, cross_check, verify_image
from nubes.drivers.problem import Failure
from nubes.drivers.runner import Runner

log = structlog.get_logger()

INTERNAL_REF = re.compile(r"^(snapshots|transfers|shelved)/[0-9a-f][0-9a-f-]{0,63}\.qcow2$")


class InvalidStoreRef(Failure, ValueError):
    reason = "InvalidStoreRef"
    retryable = False


def internal_path(root: str, ref: str) -> str:
    """The file a store-internal reference names under `root`; anything else
    (absolute paths, `..`, URLs) is refused."""
    if not INTERNAL_REF.match(ref):
        raise InvalidStoreRef(f"{ref!r} is not a store-internal reference")
    return os.path.join(os.path.abspath(root), ref)


def internal_ref(kind: str, uid: str) -> str:
    ref = f"{kind}/{uid}.qcow2"
    internal_path("/", ref)  # validates
    return ref


@dataclass(frozen=True)
class StoredImage:
    path: str
    sha256: str
    size: int
    virtual_size: int
    format: str


class ImageStore:
    def __init__(self, root: str, runner: Runner, policy: FetchPolicy | None = None):
        self.root = os.path.abspath(root)
        self.runner = runner
        self.policy = policy or FetchPolicy()

    def path_of(self, image_id: str) -> str:
        return os.path.join(self.root, image_id)

    def stored(self, image_id: str) -> bool:
        return os.path.exists(self.path_of(image_id))

    def import_url(
        self, image_id: str, url: str, declared_format: str, expected_sha256: str | None
    ) -> StoredImage:
        """Fetch under the policy, verify and inspect; store as `<root>/<image_id>`
        (idempotent: an image already stored is re-inspected, not fetched again)."""

        def fill(tmp: str) -> str:
            return fetch(url, tmp, self.policy).sha256

        return self._import(image_id, fill, url, declared_format, expected_sha256)

    def import_internal(
        self, image_id: str, ref: str, declared_format: str, expected_sha256: str
    ) -> StoredImage:
        """Import a file an agent left in the store (snapshot, transfer)."""
        source = internal_path(self.root, ref)

        def fill(tmp: str) -> str:
            with open(source, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1024 * 1024):
                    out.write(chunk)
            return sha256_file(tmp)

        return self._import(image_id, fill, ref, declared_format, expected_sha256)

    def delete_internal(self, ref: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(internal_path(self.root, ref))

    def internal_exists(self, ref: str) -> bool:
        return os.path.exists(internal_path(self.root, ref))

    def _import(
        self,
        image_id: str,
        fill: Callable[[str], str],
        described: str,
        declared_format: str,
        expected_sha256: str | None,
    ) -> StoredImage:
        make_private_dir(self.root)  # read by the components (root) only
        target = self.path_of(image_id)
        if os.path.exists(target):
            return self._describe(target, declared_format, expected_sha256, described)
        with contextlib.ExitStack() as cleanup:
            fd, tmp = tempfile.mkstemp(prefix=f".{image_id}-", dir=self.root)
            os.close(fd)
            cleanup.callback(_unlink_quietly, tmp)
            sha = fill(tmp)
            if expected_sha256 and sha != expected_sha256:
                log.warning("image digest mismatch", image=image_id, actual=sha)
                raise ChecksumMismatch(described, expected_sha256, sha)
            stored = self._inspect(tmp, declared_format, sha, described)
            private_file(tmp)
            os.replace(tmp, target)
        log.info("image imported", image=image_id, format=stored.format, bytes=stored.size)
        return StoredImage(target, stored.sha256, stored.size, stored.virtual_size, stored.format)

    def _describe(self, path: str, declared: str, expected: str | None, url: str) -> StoredImage:
        sha = sha256_file(path)
        if expected and sha != expected:
            raise ChecksumMismatch(url, expected, sha)
        return self._inspect(path, declared, sha, url)

    def _inspect(self, path: str, declared: str, sha: str, url: str) -> StoredImage:
        try:
            info = verify_image(path, declared)
            qemu = cross_check(self.runner, info)
        except ImageInspectionError as e:
            raise ImageRejected(url, e) from e
        return StoredImage(path, sha, info.file_size, qemu.virtual_size, str(info.format))

    def delete(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(image_id))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
