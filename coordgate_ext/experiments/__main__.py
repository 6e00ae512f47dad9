"""``python -m coordgate_ext.experiments``: see coordgate_ext.experiments.main."""

from .main import main

main()
