"""Process plumbing shared by the controller and the node agent: the CLI,
logging, API access, the watch caches, the work queue and the reconcile loop,
health and metrics."""
