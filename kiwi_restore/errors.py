"""Errors a user can meet, each with its documented exit code (docs/USAGE.md)."""

from __future__ import annotations


class KiwiError(Exception):
    """A failure explained to the user in one line; no traceback unless --debug."""

    exit_code = 1


class UsageError(KiwiError):
    exit_code = 2


class AuthError(KiwiError):
    """Wrong passphrase, missing or destroyed key."""

    exit_code = 3


class NotFound(KiwiError):
    """Unknown contract, machine, snapshot or path."""

    exit_code = 4


class IntegrityError(KiwiError):
    """Stored data failed authentication, is truncated, missing or inconsistent."""

    exit_code = 5


class LockedError(KiwiError):
    """Another process holds the lock and it did not free it in time."""

    exit_code = 6


class PolicyError(KiwiError):
    """Refused by the contract's rules (window closed, legal hold, production clock...)."""

    exit_code = 7


class FormatError(IntegrityError):
    """An object of an unknown or unsupported format version."""


class ObjectExists(KiwiError):
    """A backend refused to overwrite an existing object."""


class BackendError(KiwiError):
    """A storage location failed (I/O, network); retrying may help."""

    exit_code = 8
