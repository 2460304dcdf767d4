"""Kinds whose reconciler has not landed yet: they are marked Reconciling with
reason NotImplemented, so users see the object was accepted but not acted on."""

from __future__ import annotations

from typing import Any

from nubes.api.meta import Resource
from nubes.api.network import Allocation
from nubes.api.registry import ALL_KINDS
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler


def register_pending(op: Operator, handled: set[type[Resource[Any, Any]]] | None = None) -> None:
    for kind in ALL_KINDS:
        # Allocation is an internal ledger without conditions.
        if (handled and kind in handled) or kind is Allocation:
            continue
        op.register(_pending_for(kind))


def _pending_for(kind: type[Resource[Any, Any]]) -> Reconciler[Any]:
    class Pending(Reconciler[Any]):
        workers = 1

        async def converge(self, obj: Any) -> Outcome:
            return Outcome.progressing(
                "NotImplemented", f"no reconciler handles {kind.crd.kind} objects yet"
            )

    Pending.kind = kind
    return Pending()
