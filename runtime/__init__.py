"""zviz runtime core: builds OCI containers. Knows nothing of containerd."""

# The zviz release: `zviz --version`, and part of the fork server identity (runtime/forkserver.py).
VERSION = "0.1.0"
