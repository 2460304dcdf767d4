"""Typed API: one module per service group, all at version v1alpha1.

These pydantic models are the single source of truth for the CRD schemas in
`crds/` (see `nubes.api.crdgen`).
"""
