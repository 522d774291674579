"""`python -m producer.cli` runs the `embedq` command."""

import sys

from producer.cli.main import main

sys.exit(main())
