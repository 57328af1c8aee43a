"""``python -m fedimg.server certs|superlink|register|run``: the coordinator's launcher.

See :mod:`fedimg.deploy.server`.
"""

from fedimg.deploy.server import main

if __name__ == "__main__":
    raise SystemExit(main())
