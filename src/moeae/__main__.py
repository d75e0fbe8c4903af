"""``python -m moeae`` (and ``torchrun -m moeae``): the command line."""

import sys

from .cli import main

sys.exit(main())
