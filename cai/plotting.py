"""The one matplotlib set-up of the project: a file-only backend, imported when a figure is drawn, not before."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (PNG files; no display needed, and none is opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
