import sys

from bootc_unified.cli import run

sys.exit(run())
