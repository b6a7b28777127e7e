"""The viewer node: requestor, local inbox, reading room, status messages, overlays and reports."""
