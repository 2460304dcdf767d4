"""Where a node reads an imported image: the shared image store, never a URL.

Only the controller fetches tenants' URLs (under the operator's policy); a
node copies the verified store file named by the image's uid.
"""

from __future__ import annotations

from pathlib import Path

from nubes.api.image import Image
from nubes.drivers.images.cache import ImageSource


def source_of(image: Image, store_dir: Path) -> ImageSource | None:
    """The store copy of an imported image, or None while it is not imported."""
    s = image.status
    if not (s.is_true("Ready") and s.sha256):
        return None
    return ImageSource(
        path=str(store_dir / image.uid), sha256=s.sha256, disk_format=s.format or "raw"
    )
