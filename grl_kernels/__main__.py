"""``python -m grl_kernels`` runs the ``grl-kernels`` command line."""
import sys

from .cli import main

sys.exit(main())
