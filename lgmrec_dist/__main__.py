import sys

from lgmrec_dist.cli import main

sys.exit(main())
