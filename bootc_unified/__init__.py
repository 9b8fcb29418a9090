"""bootc-unified: unified storage for image-based Linux systems."""

__version__ = "0.1.0"
