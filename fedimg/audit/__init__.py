"""Privacy experiments on finished runs: membership inference (:mod:`.mia`), gradient
inversion (:mod:`.inversion`), audits of a run (:mod:`.run_audit`) and privacy/utility
sweeps (:mod:`.sweep`), with their plots. The mechanisms themselves live in :mod:`fedimg.privacy`."""
