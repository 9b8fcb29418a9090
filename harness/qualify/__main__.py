"""`python -m harness.qualify ...` = `bootc-unified-qualify ...`."""

from harness.qualify.cli import run

run()
