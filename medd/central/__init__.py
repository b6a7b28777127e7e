"""The central node: ingest, and (later) routing, delivery and tracking."""
