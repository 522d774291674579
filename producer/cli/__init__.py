"""The `embedq` command line: argument parsing and the subcommands, nothing else."""
