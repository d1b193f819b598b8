"""python -m wantune: the same as the `wantune` command."""
import sys

from wantune.tools.cli import main

sys.exit(main())
