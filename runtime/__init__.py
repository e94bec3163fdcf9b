"""zviz runtime core: builds OCI containers. Knows nothing of containerd."""
