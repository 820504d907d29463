import sys

from rsdjax.cli import main

sys.exit(main())
