"""The informer against the real API server: objects deleted while its watch
was down leave the cache (and their handlers run) when it comes back, also
when the watch had expired ("410 Gone" forces a fresh listing)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from nubes.api.compute import Flavor
from nubes.runtime.informer import Informer, Selector
from nubes.runtime.kube import Kube, path_of
from nubes.runtime.store import Store
from tests.helpers import eventually


def flavor(name: str, label: str) -> dict[str, Any]:
    return {
        "apiVersion": "compute.nubes.io/v1alpha1",
        "kind": "Flavor",
        "metadata": {"name": name, "labels": {"nubes-test/informer": label}},
        "spec": {"vcpus": 1, "ramMib": 64, "diskGib": 1},
    }


async def test_objects_deleted_while_the_watch_was_down_are_dropped(kube: Kube) -> None:
    label = uuid.uuid4().hex[:8]
    names = [f"informer-{label}-{i}" for i in range(4)]
    path = path_of(Flavor)
    store: Store[Flavor] = Store(Flavor)
    deleted: list[str] = []
    store.add_listener(lambda old, new: new is None and deleted.append(old.name))
    # A selector narrows the cache: the cluster's other flavors stay out.
    informer = Informer(kube, Flavor, store, Selector(label=f"nubes-test/informer={label}"))
    try:
        for name in names:
            await kube.create_raw(path, flavor(name, label))
        await informer.list()
        assert sorted(f.name for f in store) == names

        task = asyncio.create_task(informer.run())
        await kube.delete_raw(path, names[0])
        await eventually(lambda: names[0] in deleted, timeout=10, what="watched deletion")

        # The watch goes down; two flavors are deleted meanwhile.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for name in names[1:3]:
            await kube.delete_raw(path, name)
        # Resuming from a version the server no longer keeps answers
        # "410 Gone", as after a long outage: the informer lists again.
        informer.resource_version = "1"
        relists = informer.relists
        task = asyncio.create_task(informer.run())
        await eventually(
            lambda: sorted(deleted) == sorted(names[:3]), timeout=20, what="dropped after relist"
        )
        assert informer.relists == relists + 1
        assert [f.name for f in store] == names[3:]

        # And the resumed watch still delivers.
        await kube.delete_raw(path, names[3])
        await eventually(lambda: len(store) == 0, timeout=10, what="watch resumed")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for name in names:
            await kube.delete_raw(path, name)
