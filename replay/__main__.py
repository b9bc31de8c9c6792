"""`python -m replay RUN.jsonl [...]`: see `replay.cli`."""

from replay.cli import main

raise SystemExit(main())
