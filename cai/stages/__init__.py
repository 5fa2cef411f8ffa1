"""Stages: what a ``cai`` command runs, one module per stage (see ``cai/README.md``)."""
