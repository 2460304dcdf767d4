"""Each store index is defined once: registering another function under a
taken name fails (the last one used to win silently for every reader), and
the whole controller wires up without such a clash."""

from __future__ import annotations

from pathlib import Path

import pytest

from nubes.api.compute import Instance
from nubes.controllers import build_controller
from nubes.controllers.config import ControllerConfig
from nubes.controllers.indexes import index_instances, instance_uid
from nubes.runtime.operator import Operator
from nubes.runtime.store import Store


def test_a_second_definition_of_an_index_is_refused() -> None:
    store: Store[Instance] = Store(Instance)
    store.add_index("uid", instance_uid)
    store.add_index("uid", instance_uid)  # the owner's helper, called again
    with pytest.raises(ValueError, match="index 'uid' of Instance is already registered"):
        store.add_index("uid", lambda i: [i.name])


async def test_the_controller_registers_each_index_once(tmp_path: Path) -> None:
    op = Operator("unit", kube=None)  # type: ignore[arg-type]  # caches only, no API calls
    config = ControllerConfig(image_store=str(tmp_path / "images"))
    await build_controller(op, config)
    index_instances(op)  # a reader asking for the shared index again is fine
    assert "uid" in op.store(Instance)._index_fns
