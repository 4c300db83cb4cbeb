"""``python -m placer`` runs the CLI."""

import sys

from placer.cli import main

sys.exit(main())
