import sys

from bench.testbed.cli import main

sys.exit(main())
