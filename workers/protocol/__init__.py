"""What workers and producers both speak, importing neither side and never torch: settings, errors, key
names, queues, chunk events, result stores, model metadata, liveness records."""
