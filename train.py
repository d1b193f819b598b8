"""wantune's launcher:  accelerate launch train.py RECIPE.yaml [key=value ...]

The same command as `wantune train` (train/cli.py).
"""
import sys

from wantune.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
