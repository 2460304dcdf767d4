"""Node-local drivers. They never import kopf or the Kubernetes client."""
