"""Running what the graph pass produced: saving and loading folders (:mod:`.export`), the KV-cache
program and generation (:mod:`.generate`)."""
