"""Connection info renderings and CHAP secrets."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nubes.drivers.iscsi.connection import ChapCredentials, IscsiConnection, libvirt_secret

IQN = "iqn.2010-10.io.nubes:volume-abc"


def test_generated_chap_secrets_are_long_random_and_url_safe() -> None:
    many = {ChapCredentials.generate("abc").password for _ in range(200)}
    assert len(many) == 200
    for pw in many:
        assert len(pw) >= 20
        assert pw.isalnum()
    assert ChapCredentials.generate("abc").username == "nubes-abc"


def test_repr_hides_the_password() -> None:
    chap = ChapCredentials("u", "hunter2hunter2")
    assert "hunter2" not in repr(chap)
    assert "hunter2" not in repr(IscsiConnection("h", 3260, IQN, 1, chap))


def test_urls_and_qemu_options() -> None:
    conn = IscsiConnection("127.0.0.1", 3260, IQN, 1, ChapCredentials("nubes-abc", "pw"))
    assert conn.url() == f"iscsi://127.0.0.1:3260/{IQN}/1"
    assert conn.url(with_secret=True) == f"iscsi://nubes-abc%pw@127.0.0.1:3260/{IQN}/1"
    assert conn.qemu_image_opts() == (
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:3260,"
        f"file.target={IQN},file.lun=1,file.user=nubes-abc,file.password=pw"
    )
    assert IscsiConnection("::1", 3260, IQN, 1).portal == "[::1]:3260"


def test_libvirt_secret() -> None:
    secret = ET.tostring(libvirt_secret("vol-abc"), encoding="unicode")
    assert secret == (
        '<secret ephemeral="no" private="yes">'
        '<usage type="iscsi"><target>vol-abc</target></usage></secret>'
    )
