"""Flower glue: ClientApp, ServerApp, strategy registry and record translation.

This package is the only place besides :mod:`fedimg.engine` that imports flwr.
Handlers stay thin: the learning happens in :mod:`fedimg.task`.
"""

import os

# Flower reads these when it is first imported, so they are set before any flwr import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
