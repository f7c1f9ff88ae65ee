"""One process, one request -> one video: the Worker and what it needs."""
