"""The server side of a run: the round loop and its state, reply filters, strategies,
callbacks, checkpoints, and the Flower ServerApp (:mod:`.app`)."""
