"""``python -m pyro_flowpack``: the ``flowpack`` command."""

import sys

from .cli import main

sys.exit(main())
