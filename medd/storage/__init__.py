"""Storage: the relational index, the blob store, and (later) the archive."""
