"""Simulation: the engine (the only importer of ``flwr.simulation`` and ``ray``), simulated
device fleets (:mod:`.fleet`), Byzantine attacks (:mod:`.attacks`) and chaos faults (:mod:`.faults`)."""
