"""Coverage-guided fuzz targets (atheris) for what medd reads off the wire; see fuzz/README.md."""
