"""The image store (Glance's filesystem store): imports image data once,
verified and inspected, and keeps it for nodes to fetch into their caches.

Import order matters: checksum first (the bytes are what the user promised),
then the pure-Python header inspection (format, backing file, data file,
encryption), then a qemu-img cross-check with the format always explicit.
Nothing is stored unless every step passed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import structlog

from nubes.drivers.images.cache import ChecksumMismatch, ImageRejected, download, sha256_file
from nubes.drivers.images.inspect import ImageInspectionError, cross_check, verify_image
from nubes.drivers.runner import Runner

log = structlog.get_logger()


@dataclass(frozen=True)
class StoredImage:
    path: str
    sha256: str
    size: int
    virtual_size: int
    format: str


class ImageStore:
    def __init__(
        self,
        root: str,
        runner: Runner,
        *,
        fetch_timeout: float = 120,
        max_image_bytes: int | None = None,
    ):
        self.root = os.path.abspath(root)
        self.runner = runner
        self.fetch_timeout = fetch_timeout
        self.max_image_bytes = max_image_bytes

    def path_of(self, image_id: str) -> str:
        return os.path.join(self.root, image_id)

    def import_image(
        self, image_id: str, url: str, declared_format: str, expected_sha256: str | None
    ) -> StoredImage:
        """Fetch, verify and inspect; store as `<root>/<image_id>` (idempotent:
        an image already stored is re-inspected, not fetched again)."""
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        target = self.path_of(image_id)
        if os.path.exists(target):
            return self._describe(target, declared_format, expected_sha256, url)
        with contextlib.ExitStack() as cleanup:
            fd, tmp = tempfile.mkstemp(prefix=f".{image_id}-", dir=self.root)
            os.close(fd)
            cleanup.callback(_unlink_quietly, tmp)
            sha, _ = download(url, tmp, timeout=self.fetch_timeout, max_bytes=self.max_image_bytes)
            if expected_sha256 and sha != expected_sha256:
                raise ChecksumMismatch(url, expected_sha256, sha)
            stored = self._inspect(tmp, declared_format, sha, url)
            os.chmod(tmp, 0o644)
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
