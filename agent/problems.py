"""The agent's side of the one error channel: a failure on this node becomes
the object's `status.nodeProblem` (typed, with the node's name), which the
controller folds into the object's conditions. See nubes.drivers.problem."""

from __future__ import annotations

from nubes.api.meta import NodeProblem
from nubes.drivers.problem import Problem


def node_problem(problem: Problem | None, node: str) -> NodeProblem | None:
    """The status value reporting `problem` (None clears it)."""
    if problem is None:
        return None
    return NodeProblem(
        reason=problem.reason, message=problem.message, retryable=problem.retryable, node=node
    )
