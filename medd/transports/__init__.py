"""Transports: how packages and DICOM objects reach a node (and, later, leave it)."""
