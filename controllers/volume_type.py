"""VolumeType: valid extra specs, and a backend some node serves.

A type naming a backend no node reports is Stalled `NoSuchBackend` (and
re-evaluated whenever the nodes' pools change): volumes of that type could
never be placed. Like Cinder, the type itself does not reserve anything.
"""

from __future__ import annotations

from nubes.api.compute import Hypervisor
from nubes.api.storage import VolumeType
from nubes.controllers.volume_scheduler import BACKEND_KEY, InvalidSpec, check_spec
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall


class VolumeTypeReconciler(Reconciler[VolumeType]):
    kind = VolumeType
    workers = 1

    def setup(self, op: Operator) -> None:
        super().setup(op)
        op.watch(
            Hypervisor,
            VolumeType,
            lambda _: [t.key for t in op.store(VolumeType)],
            when=lambda old, new: _backends(old) != _backends(new),
        )

    async def converge(self, obj: VolumeType) -> Outcome:
        for key, value in sorted(obj.spec.extra_specs.items()):
            try:
                check_spec(value)
            except InvalidSpec as e:
                raise Stall("InvalidExtraSpecs", f"extra spec {key}: {e}") from e
        wanted = {obj.spec.backend_name, obj.spec.extra_specs.get(BACKEND_KEY)} - {None}
        if len(wanted) > 1:
            raise Stall(
                "ConflictingBackends",
                f"backendName {obj.spec.backend_name} and extra spec {BACKEND_KEY}"
                f" {obj.spec.extra_specs[BACKEND_KEY]} name different backends",
            )
        known = sorted(
            {p.backend for hv in self.op.store(Hypervisor) for p in hv.status.storage_pools}
        )
        for backend in wanted:
            if backend not in known:
                raise Stall(
                    "NoSuchBackend",
                    f"volume type {obj.name} needs backend {backend}, which no node reports"
                    f" (backends: {', '.join(known) or 'none'})",
                )
        where = f"backend {next(iter(wanted))}" if wanted else "any backend"
        specs = len(obj.spec.extra_specs)
        return Outcome.ready(message=f"{where}, {specs} extra spec{'s' if specs != 1 else ''}")


def _backends(hv: Hypervisor | None) -> frozenset[str] | None:
    return None if hv is None else frozenset(p.backend for p in hv.status.storage_pools)
