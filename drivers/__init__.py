"""Node-local drivers. They never import the Kubernetes client."""
