"""Serving and batch rendering: HTTP API, job store, executors (local, torchrun, Ray)."""
