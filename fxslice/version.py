"""The fxslice version, in a module of its own so that any module can import it at its top."""

__version__ = "0.1.0"
