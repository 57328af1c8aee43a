"""``python -m fedimg.client --site SITE.yaml``: a site's client daemon (fedimg.deploy.client)."""

from fedimg.deploy.client import main

if __name__ == "__main__":
    raise SystemExit(main())
