"""The corpus job: read and validate a corpus (readers), chunk and send it (runner, broker), re-send what is
lost or slow (dispatcher), collect into the output (output), and report it (record, status)."""
