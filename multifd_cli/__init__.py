"""multifd: live-migrate a changing file to another host over parallel channels."""

__version__ = "0.1.0"
