"""Flower glue: ClientApp, ServerApp, strategy registry and record translation.

This package is the only place besides :mod:`fedimg.engine` that imports flwr.
Handlers stay thin: the learning happens in :mod:`fedimg.task`.
"""
