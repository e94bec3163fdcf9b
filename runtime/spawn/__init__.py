"""Spawning a container's processes: the sync channel's messages (messages.py)."""
