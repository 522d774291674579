"""`python -m producer.cli` runs the `embedq` command."""

from producer.cli.main import run

run()
