import sys

from bootc_unified.cli import main

sys.exit(main())
