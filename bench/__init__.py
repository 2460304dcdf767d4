"""Benchmarks: `python -m bench.<name>` against the cluster KUBECONFIG names
(see the bench-* targets of the Makefile)."""
