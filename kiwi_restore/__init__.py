"""kiwi-restore: restore and reversibility service for per-contract encrypted backups."""

__version__ = "0.1.0"
