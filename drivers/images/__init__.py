"""Node-local image handling: header inspection and the per-node image cache."""
