"""medd: carries medical images, and everything said about them, between
imaging centres, a central node and radiologists' viewers."""

__version__ = "0.1.0"
