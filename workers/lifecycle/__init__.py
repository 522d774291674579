"""A worker process's life around the Celery app: start-up checks (memory, model), crash-loop markers,
the shutdown watchdog, and skipping the interpreter's teardown."""
