"""Deployment glue: site configs, client daemon, SuperLink launcher, certificates."""
