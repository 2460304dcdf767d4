"""What a compute node needs to reach an exported volume, and its renderings.

The target driver (tgt.py) returns an `IscsiConnection`; the initiator side
(initiator.py) consumes it, either logging in with iscsiadm or handing it to
QEMU's own initiator through a libvirt network disk.
"""

from __future__ import annotations

import secrets
import string
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

_ALPHABET = string.ascii_letters + string.digits
CHAP_SECRET_LENGTH = 24  # ~143 bits; RFC 3720 wants >= 96 bits, some initiators cap at 255


@dataclass(frozen=True)
class ChapCredentials:
    """CHAP for the initiator logging into the target (tgt "incoming" account).

    The password never appears in repr(); the caller persists it (e.g. in a
    Kubernetes Secret), because tgtd cannot tell it back after a restart.
    """

    username: str
    password: str = field(repr=False)

    @classmethod
    def generate(cls, volume_id: str) -> ChapCredentials:
        # Letters and digits only: the secret goes into iscsi:// URLs and argv.
        password = "".join(secrets.choice(_ALPHABET) for _ in range(CHAP_SECRET_LENGTH))
        return cls(username=f"nubes-{volume_id}"[:64], password=password)


@dataclass(frozen=True)
class IscsiConnection:
    portal_host: str
    portal_port: int
    iqn: str
    lun: int
    chap: ChapCredentials | None = None

    @property
    def portal(self) -> str:
        host = f"[{self.portal_host}]" if ":" in self.portal_host else self.portal_host
        return f"{host}:{self.portal_port}"

    @property
    def source_name(self) -> str:
        """libvirt `<source protocol='iscsi' name=...>`: IQN/LUN."""
        return f"{self.iqn}/{self.lun}"

    def url(self, *, with_secret: bool = False) -> str:
        """iscsi://[user%password@]host:port/IQN/LUN (libiscsi and QEMU syntax)."""
        auth = ""
        if self.chap is not None and with_secret:
            user = urllib.parse.quote(self.chap.username, safe="")
            auth = f"{user}%{urllib.parse.quote(self.chap.password, safe='')}@"
        return f"iscsi://{auth}{self.portal}/{self.iqn}/{self.lun}"

    def qemu_image_opts(self) -> str:
        """`--image-opts` value for qemu-img/qemu-io (contains the secret)."""
        opts = [
            "driver=raw",
            "file.driver=iscsi",
            "file.transport=tcp",
            f"file.portal={self.portal}",
            f"file.target={self.iqn}",
            f"file.lun={self.lun}",
        ]
        if self.chap is not None:
            opts += [f"file.user={self.chap.username}", f"file.password={self.chap.password}"]
        return ",".join(opts)


def libvirt_secret(usage: str, description: str = "") -> ET.Element:
    """A private, non-ephemeral iSCSI secret; set its value with the CHAP password."""
    secret = ET.Element("secret", ephemeral="no", private="yes")
    if description:
        ET.SubElement(secret, "description").text = description
    usage_el = ET.SubElement(secret, "usage", type="iscsi")
    ET.SubElement(usage_el, "target").text = usage
    return secret
