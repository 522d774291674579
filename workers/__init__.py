"""embedq workers: the Celery app, the encoder and the result stores."""
