import sys

from client_agent.cli import main

sys.exit(main())
