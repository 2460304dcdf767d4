"""Flavor: a catalogue entry; Ready once accepted (the schema validated it)."""

from __future__ import annotations

from nubes.api.compute import Flavor
from nubes.runtime.reconcile import Outcome, Reconciler


class FlavorReconciler(Reconciler[Flavor]):
    kind = Flavor
    workers = 1

    async def converge(self, obj: Flavor) -> Outcome:
        s = obj.spec
        return Outcome.ready(message=f"{s.vcpus} vCPU, {s.ram_mib} MiB RAM, {s.disk_gib} GiB disk")
