"""echod: a production-grade echo daemon."""

__version__ = "0.1.0"
