"""Comparison grids: pooled, local-only and federated strategies over seeds (:mod:`.grid`)."""
