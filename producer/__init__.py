"""embedq producer: read corpora, send chunk tasks, collect ordered embeddings. Never imports torch."""
