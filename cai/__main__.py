"""``python -m cai``: the ``cai`` command where the package is on the path but not installed (e.g. a GPU machine)."""

from cai.cli import main

main()
