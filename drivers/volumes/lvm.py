"""The LVM backend: one LV per volume in a volume group, thick or thin.

Names: `volume-<id>` and `snapshot-<id>` in the configured VG; with a thin
pool configured, volumes are thin LVs of that pool and snapshots/clones are
thin snapshots. Everything is listed back with `lvs --reportformat json`, so
a restarted agent re-adopts what exists.

Secure delete follows Cinder's LVM driver: a thick LV is overwritten with
`dd if=/dev/zero ... oflag=direct` before `lvremove` (for a thick snapshot,
its copy-on-write store `-cow`); a thin LV is not, because writing zeros
would allocate the whole LV in the pool, and a thin pool hands out only
zeroed blocks (its zeroing is on by default; `detect_thin_zeroing` checks).

Device-mapper is needed for everything but the VG itself; `detect_lvm`
tells whether this node has it.

(About 470 lines: the backend's verbs share the VG/thin-pool naming and
listing.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog

from nubes.drivers.runner import CommandError, Runner
from nubes.drivers.volumes import image
from nubes.drivers.volumes.base import (
    GIB,
    MIB,
    BackendUnavailable,
    ImageRejected,
    NoSpace,
    NotFound,
    PoolStats,
    ShrinkRefused,
    SnapshotInfo,
    StorageError,
    VolumeBusy,
    VolumeInfo,
    check_id,
    check_size,
)

log = structlog.get_logger()

VOLUME_PREFIX = "volume-"
SNAPSHOT_PREFIX = "snapshot-"
LVS_FIELDS = "lv_name,lv_size,lv_attr,origin,pool_lv,lv_path,data_percent"


@dataclass(frozen=True)
class LvmSupport:
    usable: bool
    reason: str
    """Why not, in the tools' own words (empty when usable)."""


def detect_lvm(runner: Runner) -> LvmSupport:
    """Whether LVs can be made here: device-mapper answers and has `striped`.

    Other targets (snapshot, thin-pool) are kernel modules loaded on first
    use, so `dmsetup targets` not listing them yet proves nothing.
    """
    result = runner(["dmsetup", "targets"], check=False)
    if result.returncode != 0:
        reason = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        return LvmSupport(False, f"device-mapper unavailable: {reason or 'dmsetup failed'}")
    have = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    if "striped" not in have:
        return LvmSupport(False, "device-mapper has no striped target")
    return LvmSupport(True, "")


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    size_bytes: int
    attr: str
    origin: str
    pool_lv: str
    path: str
    data_percent: float | None

    @property
    def is_open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_thick_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")


def parse_lvs(text: str) -> list[LogicalVolume]:
    rows: list[dict[str, Any]] = []
    for report in json.loads(text).get("report", []):
        rows.extend(report.get("lv", []))
    return [
        LogicalVolume(
            name=r["lv_name"],
            size_bytes=int(r.get("lv_size") or 0),
            attr=r.get("lv_attr", ""),
            origin=r.get("origin", ""),
            pool_lv=r.get("pool_lv", ""),
            path=r.get("lv_path", ""),
            data_percent=float(r["data_percent"]) if r.get("data_percent") else None,
        )
        for r in rows
    ]


def parse_vgs(text: str) -> tuple[int, int]:
    """(size, free) in bytes of the one VG reported."""
    for report in json.loads(text).get("report", []):
        for vg in report.get("vg", []):
            return int(vg["vg_size"]), int(vg["vg_free"])
    raise StorageError("vgs reported no volume group")


def mapper_name(vg: str, lv: str) -> str:
    """/dev/mapper name of an LV: device-mapper doubles each '-' in both parts."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


class LvmBackend:
    """Implements VolumeBackend and ImageImport on an existing VG."""

    def __init__(
        self,
        runner: Runner,
        vg: str,
        *,
        thin_pool: str | None = None,
        backend_name: str = "lvm",
        pool_name: str | None = None,
        max_over_subscription_ratio: float = 20.0,
        reserved_percentage: int = 0,
    ) -> None:
        self.runner = runner
        self.vg = vg
        self.thin_pool = thin_pool
        self.backend_name = backend_name
        self.pool_name = pool_name or vg
        self.max_over_subscription_ratio = max_over_subscription_ratio
        self.reserved_percentage = reserved_percentage
        self.log = log.bind(backend=backend_name, vg=vg)

    # --- reading state ------------------------------------------------------------

    def _lvs(self) -> list[LogicalVolume]:
        return parse_lvs(self._report("lvs", LVS_FIELDS))

    def _report(self, command: str, fields: str) -> str:
        """JSON report in bytes (`lvs`/`vgs`), the machine-readable form."""
        argv = [command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields]
        return self.runner([*argv, self.vg]).stdout

    def _lv(self, name: str) -> LogicalVolume | None:
        return next((lv for lv in self._lvs() if lv.name == name), None)

    def _vol(self, volume_id: str) -> str:
        return VOLUME_PREFIX + check_id("volume", volume_id)

    def _snap(self, snapshot_id: str) -> str:
        return SNAPSHOT_PREFIX + check_id("snapshot", snapshot_id)

    def _volume_info(self, lv: LogicalVolume) -> VolumeInfo:
        return VolumeInfo(
            id=lv.name[len(VOLUME_PREFIX) :],
            size_gib=-(-lv.size_bytes // GIB),
            path=lv.path or f"/dev/{self.vg}/{lv.name}",
            allocated_bytes=_allocated(lv),
        )

    def _snapshot_info(self, lv: LogicalVolume) -> SnapshotInfo:
        return SnapshotInfo(
            id=lv.name[len(SNAPSHOT_PREFIX) :],
            volume_id=lv.origin[len(VOLUME_PREFIX) :],
            size_gib=-(-lv.size_bytes // GIB),
            path=lv.path or f"/dev/{self.vg}/{lv.name}",
            allocated_bytes=_allocated(lv),
        )

    def get_volume(self, volume_id: str) -> VolumeInfo | None:
        lv = self._lv(self._vol(volume_id))
        return self._volume_info(lv) if lv else None

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        lv = self._lv(self._snap(snapshot_id))
        return self._snapshot_info(lv) if lv else None

    def volume_path(self, volume_id: str) -> str:
        info = self.get_volume(volume_id)
        if info is None:
            raise NotFound("volume", volume_id, f"volume group {self.vg}")
        return info.path

    def list_volumes(self) -> list[VolumeInfo]:
        return [self._volume_info(lv) for lv in self._lvs() if lv.name.startswith(VOLUME_PREFIX)]

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [
            self._snapshot_info(lv) for lv in self._lvs() if lv.name.startswith(SNAPSHOT_PREFIX)
        ]

    def pool_stats(self) -> PoolStats:
        lvs = self._lvs()
        ours = [lv for lv in lvs if lv.name.startswith((VOLUME_PREFIX, SNAPSHOT_PREFIX))]
        provisioned = sum(lv.size_bytes for lv in ours) / GIB
        total, free = self._capacity(lvs)
        return PoolStats(
            backend_name=self.backend_name,
            pool_name=self.pool_name,
            total_gib=total / GIB,
            free_gib=free / GIB,
            provisioned_gib=provisioned,
            total_volumes=sum(1 for lv in ours if lv.name.startswith(VOLUME_PREFIX)),
            capabilities={
                "storage_protocol": "iSCSI",
                "thin_provisioning_support": self.thin_pool is not None,
                "thick_provisioning_support": self.thin_pool is None,
                "max_over_subscription_ratio": (
                    self.max_over_subscription_ratio if self.thin_pool else 1.0
                ),
                "reserved_percentage": self.reserved_percentage,
                "sparse_copy_volume": self.thin_pool is not None,
                "revert_to_snapshot_support": False,
                "multiattach": False,
                "QoS_support": False,
            },
        )

    def _capacity(self, lvs: list[LogicalVolume]) -> tuple[int, int]:
        if self.thin_pool:
            pool = next((lv for lv in lvs if lv.name == self.thin_pool), None)
            if pool is None:
                raise BackendUnavailable(f"thin pool {self.vg}/{self.thin_pool} does not exist")
            used = int(pool.size_bytes * (pool.data_percent or 0.0) / 100)
            return pool.size_bytes, pool.size_bytes - used
        return parse_vgs(self._report("vgs", "vg_name,vg_size,vg_free"))

    # --- the core -----------------------------------------------------------------

    def create_volume(self, volume_id: str, size_gib: int) -> VolumeInfo:
        check_size(size_gib)
        name = self._vol(volume_id)
        lv = self._lv(name)
        if lv is None:
            self._check_room(f"volume {volume_id}", size_gib)
            if self.thin_pool:
                argv = ["lvcreate", "-n", name, "-V", f"{size_gib}g", "--thinpool", self.thin_pool]
            else:
                argv = ["lvcreate", "-n", name, "-L", f"{size_gib}g", "--yes"]
            self._lvm([*argv, self.vg], f"creating volume {volume_id}")
            self.log.info("volume created", volume=volume_id, size_gib=size_gib)
            lv = self._must(name, "volume", volume_id)
        return self._volume_info(lv)

    def delete_volume(self, volume_id: str) -> None:
        name = self._vol(volume_id)
        lvs = self._lvs()
        lv = next((x for x in lvs if x.name == name), None)
        if lv is None:
            return
        snaps = sorted(x.name[len(SNAPSHOT_PREFIX) :] for x in lvs if x.origin == name)
        if snaps:
            raise VolumeBusy(volume_id, f"it has snapshots: {', '.join(snaps)}")
        if lv.is_open:
            raise VolumeBusy(volume_id, "its LV is open (exported or attached)")
        if not lv.is_thin:
            self._wipe(lv.path or f"/dev/{self.vg}/{name}", lv.size_bytes)
        self._remove(name)
        self.log.info("volume deleted", volume=volume_id, wiped=not lv.is_thin)

    def extend_volume(self, volume_id: str, new_size_gib: int) -> VolumeInfo:
        check_size(new_size_gib)
        name = self._vol(volume_id)
        lv = self._must(name, "volume", volume_id)
        current = -(-lv.size_bytes // GIB)
        if new_size_gib < current:
            raise ShrinkRefused(volume_id, current, new_size_gib)
        if new_size_gib == current:
            return self._volume_info(lv)
        if lv.is_open:
            raise VolumeBusy(volume_id, "its LV is open (exported or attached)")
        self._check_room(f"extending {volume_id}", new_size_gib - current)
        self._lvm(
            ["lvextend", "-L", f"{new_size_gib}g", f"{self.vg}/{name}"], f"extending {volume_id}"
        )
        self.log.info("volume extended", volume=volume_id, old_gib=current, new_gib=new_size_gib)
        return self._volume_info(self._must(name, "volume", volume_id))

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        name = self._snap(snapshot_id)
        origin = self._vol(volume_id)
        lvs = self._lvs()
        existing = next((x for x in lvs if x.name == name), None)
        if existing is None:
            src = next((x for x in lvs if x.name == origin), None)
            if src is None:
                raise NotFound("volume", volume_id, f"volume group {self.vg}")
            argv = ["lvcreate", "-n", name, "-s"]
            if self.thin_pool:
                argv += ["--setactivationskip", "n"]  # thin snapshots skip activation otherwise
            else:
                # Cinder sizes the COW store like the origin: it can never overflow.
                size = -(-src.size_bytes // GIB)
                self._check_room(f"snapshot {snapshot_id}", size)
                argv += ["-L", f"{size}g"]
            self._lvm([*argv, f"{self.vg}/{origin}"], f"snapshotting {volume_id}")
            self.log.info("snapshot created", snapshot=snapshot_id, volume=volume_id)
            existing = self._must(name, "snapshot", snapshot_id)
        elif existing.origin != origin:
            raise StorageError(
                f"snapshot id {snapshot_id} is already a snapshot of {existing.origin},"
                f" not {origin}"
            )
        return self._snapshot_info(existing)

    def delete_snapshot(self, snapshot_id: str) -> None:
        name = self._snap(snapshot_id)
        lv = self._lv(name)
        if lv is None:
            return
        if lv.is_open:
            raise StorageError(f"snapshot {snapshot_id} is in use (its LV is open)")
        if lv.is_thick_snapshot:
            # The snapshot's own data lives in its copy-on-write store.
            self._wipe(f"/dev/mapper/{mapper_name(self.vg, name)}-cow", lv.size_bytes)
        self._remove(name)
        self.log.info("snapshot deleted", snapshot=snapshot_id)

    def create_volume_from_snapshot(
        self, volume_id: str, snapshot_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        snap = self._must(self._snap(snapshot_id), "snapshot", snapshot_id)
        return self._copy_lv(volume_id, snap, size_gib)

    def clone_volume(
        self, volume_id: str, source_volume_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        src = self._must(self._vol(source_volume_id), "volume", source_volume_id)
        return self._copy_lv(volume_id, src, size_gib)

    def _copy_lv(self, volume_id: str, src: LogicalVolume, size_gib: int | None) -> VolumeInfo:
        name = self._vol(volume_id)
        existing = self._lv(name)
        if existing is not None:
            return self._volume_info(existing)
        src_gib = -(-src.size_bytes // GIB)
        size = src_gib if size_gib is None else check_size(size_gib)
        if size < src_gib:
            raise ShrinkRefused(volume_id, src_gib, size)
        if self.thin_pool:
            # A thin snapshot of the source is an independent thin volume.
            self._lvm(
                [
                    "lvcreate",
                    "-n",
                    name,
                    "-s",
                    "--setactivationskip",
                    "n",
                    f"{self.vg}/{src.name}",
                ],
                f"creating volume {volume_id}",
            )
            if size > src_gib:
                self._lvm(
                    ["lvextend", "-L", f"{size}g", f"{self.vg}/{name}"], f"growing {volume_id}"
                )
        else:
            self.create_volume(volume_id, size)
            dst = self._must(name, "volume", volume_id)
            src_path = src.path or f"/dev/{self.vg}/{src.name}"
            self._dd(src_path, dst.path, src.size_bytes)
        self.log.info("volume created from copy", volume=volume_id, source=src.name)
        return self._volume_info(self._must(name, "volume", volume_id))

    # --- optional: image import -----------------------------------------------------

    def copy_image_to_volume(
        self, volume_id: str, image_path: str, image_format: str
    ) -> VolumeInfo:
        lv = self._must(self._vol(volume_id), "volume", volume_id)
        facts = image.inspect_image(self.runner, image_path, image_format)
        if facts.virtual_size > lv.size_bytes:
            raise ImageRejected(
                f"image {image_path} needs {facts.virtual_size} bytes;"
                f" volume {volume_id} has {lv.size_bytes}"
            )
        if lv.is_open:
            raise VolumeBusy(volume_id, "its LV is open (exported or attached)")
        # A new thin LV reads as zeros; a thick one is zero only if every delete wiped.
        image.convert_to_raw(
            self.runner, image_path, image_format, lv.path, target_is_zero=lv.is_thin
        )
        return self._volume_info(lv)

    # --- commands -----------------------------------------------------------------

    def _must(self, name: str, kind: str, ident: str) -> LogicalVolume:
        lv = self._lv(name)
        if lv is None:
            raise NotFound(kind, ident, f"volume group {self.vg}")
        return lv

    def _lvm(self, argv: list[str], what: str) -> None:
        try:
            self.runner(argv, timeout=300)
        except CommandError as e:
            text = e.stderr
            if "Insufficient free space" in text or "insufficient free space" in text:
                raise NoSpace(what, 0.0, 0.0, self.pool_name) from e
            if "device-mapper" in text or "target(s) not detected" in text:
                raise BackendUnavailable(f"{what}: {text.strip()}") from e
            raise StorageError(f"{what} failed: {text.strip() or e}") from e

    def _remove(self, name: str) -> None:
        self._lvm(
            [
                "lvremove",
                "--config",
                "activation { retry_deactivation = 1 }",
                "-f",
                f"{self.vg}/{name}",
            ],
            f"removing {name}",
        )

    def _wipe(self, device: str, size_bytes: int) -> None:
        self._dd("/dev/zero", device, size_bytes)

    def _dd(self, src: str, dst: str, size_bytes: int) -> None:
        argv = ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={-(-size_bytes // MIB)}"]
        if src != "/dev/zero":
            argv.append("iflag=direct")
        self.runner([*argv, "oflag=direct", "status=none"], timeout=None)

    def _check_room(self, what: str, add_gib: int) -> None:
        lvs = self._lvs()
        total, free = self._capacity(lvs)
        if self.thin_pool:
            provisioned = sum(
                lv.size_bytes for lv in lvs if lv.name.startswith((VOLUME_PREFIX, SNAPSHOT_PREFIX))
            )
            room = (
                total
                / GIB
                * (1 - self.reserved_percentage / 100)
                * self.max_over_subscription_ratio
                - provisioned / GIB
            )
        else:
            room = free / GIB - total / GIB * self.reserved_percentage / 100
        if add_gib > room:
            raise NoSpace(what, float(add_gib), max(room, 0.0), self.pool_name)


def _allocated(lv: LogicalVolume) -> int | None:
    if lv.is_thin and lv.data_percent is not None:
        return int(lv.size_bytes * lv.data_percent / 100)
    return None if lv.is_thin else lv.size_bytes
