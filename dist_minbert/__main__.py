import sys

from dist_minbert.cli import main

sys.exit(main())
