"""Write an OCI image archive (the layout `ctr images import` reads) from
directory trees, one uncompressed layer per tree, byte-for-byte reproducible:
entries sorted, owners and times fixed, no registry or container engine needed.

    python3 oci_archive.py OUT.tar NAME:TAG --layer DIR[=PREFIX] ... \
        [--env K=V] [--entrypoint ARG ...] [--workdir DIR]

A layer `DIR=opt/nubes` puts DIR's contents below opt/nubes in the image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def _layer(tree: Path, prefix: str, out: Path) -> None:
    """A tar of TREE below PREFIX with normalised metadata; hard links kept."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        parts = [p for p in prefix.split("/") if p]
        for i in range(len(parts)):  # parent directories of the prefix
            info = tarfile.TarInfo("/".join(parts[: i + 1]))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        seen: dict[tuple[int, int], str] = {}
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            here = Path(dirpath)
            for name in [*sorted(dirnames), *sorted(filenames)]:
                path = here / name
                arc = "/".join([*parts, str(path.relative_to(tree))])
                st = path.lstat()
                info = tar.gettarinfo(str(path), arc)
                info.mtime, info.uname, info.gname = EPOCH, "", ""
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        info.type, info.linkname, info.size = tarfile.LNKTYPE, seen[key], 0
                        tar.addfile(info)
                        continue
                    seen[key] = arc
                    info.type = tarfile.REGTYPE
                if info.isreg():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _file_blob(blobs: Path, path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    size = path.stat().st_size
    path.rename(blobs / digest)
    return f"sha256:{digest}", size


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("ref", help="NAME:TAG")
    p.add_argument("--layer", action="append", default=[], help="DIR[=PREFIX]")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--entrypoint", nargs="*", default=[])
    p.add_argument("--workdir", default="/")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.out))) as work:
        root = Path(work)
        blobs = root / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layers = []
        for i, spec in enumerate(a.layer):
            tree, _, prefix = spec.partition("=")
            tmp = root / f"layer{i}.tar"
            _layer(Path(tree), prefix, tmp)
            layers.append(_file_blob(blobs, tmp))
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": a.env, "Entrypoint": a.entrypoint or None, "WorkingDir": a.workdir},
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
        }
        cfg_digest, cfg_size = _blob(blobs, _json(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": cfg_size,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s}
                for d, s in layers
            ],
        }
        man_digest, man_size = _blob(blobs, _json(manifest))
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man_digest,
                    "size": man_size,
                    "annotations": {
                        "io.containerd.image.name": a.ref,
                        "org.opencontainers.image.ref.name": a.ref.rsplit(":", 1)[1],
                    },
                }
            ],
        }
        (root / "index.json").write_bytes(_json(index))
        (root / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in ["oci-layout", "index.json", "blobs", "blobs/sha256"]:
                info = tar.gettarinfo(str(root / name), name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
                if info.isreg():
                    with (root / name).open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
            for blob in sorted(blobs.iterdir()):
                info = tar.gettarinfo(str(blob), f"blobs/sha256/{blob.name}")
                info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
                with blob.open("rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp_out, a.out)
        print(man_digest)


if __name__ == "__main__":
    main()
