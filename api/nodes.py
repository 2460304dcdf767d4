"""Node labels: which node agents cache an object.

A node agent lists and watches only the objects labelled for its node
(`node.nubes.io/<node>`), so its memory follows its node's share of the
cloud, not the cloud's size. The controller keeps the labels (one key per
node the object concerns: a Port's host and DHCP node, an Instance's node and
the target of a move under way, a Volume's storage and compute nodes, ...);
the agents read them through a label selector. The API server sends a
watcher a deletion when an object stops matching its selector and an
addition when it starts to, so a move is seen as "left" on the old node and
"arrived" on the new one.

Why one key per node and not `nubes.io/node=NAME`: an object can concern
several nodes at once (a port bound on one node and served by another's DHCP
server), and a label key holds one value.

Label names are at most 63 characters of [A-Za-z0-9._-], beginning and ending
alphanumeric. Node names are DNS subdomains of up to 253 characters: a name
that is not a valid label name is shortened, with a digest of the whole name
so that two long names never share a key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

NODE_LABEL_PREFIX = "node.nubes.io/"
LABEL_NAME_MAX = 63
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_DIGEST = 16


def valid_label_name(name: str) -> bool:
    return len(name) <= LABEL_NAME_MAX and _LABEL_NAME.match(name) is not None


def node_label(node: str) -> str:
    """The label key naming `node` (a node name as the agent is started with)."""
    if not node:
        raise ValueError("a node label needs a node name")
    if valid_label_name(node):
        return NODE_LABEL_PREFIX + node
    digest = hashlib.sha256(node.encode()).hexdigest()[:_DIGEST]
    readable = re.sub(r"[^A-Za-z0-9._-]", "-", node)[: LABEL_NAME_MAX - _DIGEST - 1]
    readable = re.sub(r"^[^A-Za-z0-9]+", "", readable)
    name = f"{readable}-{digest}" if readable else digest
    assert valid_label_name(name), name
    return NODE_LABEL_PREFIX + name


def node_selector(node: str) -> str:
    """The label selector of the objects that concern `node`."""
    return node_label(node)


def node_labels_patch(
    current: Mapping[str, str] | None, nodes: Iterable[str | None]
) -> dict[str, str | None] | None:
    """The merge patch of metadata.labels that leaves exactly the node labels
    of `nodes` (empty names ignored), other labels untouched; None when the
    labels are right already."""
    wanted = {node_label(n) for n in nodes if n}
    have = {k for k in current or {} if k.startswith(NODE_LABEL_PREFIX)}
    patch: dict[str, str | None] = {k: "" for k in sorted(wanted - have)}
    patch.update({k: None for k in sorted(have - wanted)})
    return patch or None
