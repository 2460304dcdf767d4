"""Serial consoles for users: the tail of each local guest's console log in
a ConfigMap `<instance>-console` in its project, labelled with this node so
that only this node's agent may change it (nubes-agent-node policy)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from nubes.agent.config import NODE_LABEL
from nubes.api.compute import Instance
from nubes.runtime.kube import CONFIGMAPS, ApiError
from nubes.runtime.operator import Operator

log = structlog.get_logger()

CONSOLE_TAIL = 64 * 1024


class Consoles:
    def __init__(
        self,
        node: str,
        log_of: Callable[[Instance], Path],
        runs_here: Callable[[Instance], bool],
    ) -> None:
        self.node = node
        self.log_of = log_of
        self.runs_here = runs_here
        self._digest: dict[str, str] = {}

    def register(self, op: Operator, interval: float = 5.0) -> None:
        self.op = op
        op.every(interval, self.publish)

    async def publish(self) -> None:
        """The tail of each local serial console, in a ConfigMap users can read."""
        for inst in list(self.op.store(Instance)):
            if inst.deleting or not self.runs_here(inst):
                continue
            tail = await asyncio.to_thread(_tail, self.log_of(inst), CONSOLE_TAIL)
            if tail is None:
                continue
            digest = hashlib.sha256(tail.encode()).hexdigest()
            if self._digest.get(inst.uid) == digest:
                continue
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"{inst.name}-console",
                    "namespace": inst.namespace,
                    # The node label: only this node's agent may change it.
                    "labels": {"nubes.io/instance": inst.name, NODE_LABEL: self.node},
                    "ownerReferences": [
                        {
                            "apiVersion": Instance.crd.api_version,
                            "kind": "Instance",
                            "name": inst.name,
                            "uid": inst.uid,
                        }
                    ],
                },
                "data": {"console.log": tail},
            }
            try:
                await self.op.kube.apply_raw(CONFIGMAPS, body)
                self._digest[inst.uid] = digest
            except ApiError as e:
                log.warning("console publish failed", instance=inst.key, error=str(e))

    def forget(self, inst: Instance) -> None:
        self._digest.pop(inst.uid, None)

    async def drop(self, inst: Instance) -> None:
        """The console ConfigMap carries this node's label, which only this
        agent may change: a node the instance moved to makes its own."""
        self.forget(inst)
        try:
            await self.op.kube.delete_raw(CONFIGMAPS, f"{inst.name}-console", inst.namespace)
        except ApiError as e:
            if e.status != 403:  # another node's map: admission keeps it
                raise


def _tail(path: Path, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None
