"""Errors raised for bad user input. Each message names the problem and the fix."""


class DistilleryError(Exception):
    """Base class: a problem the user can fix, found before expensive work starts."""


class ConfigError(DistilleryError):
    """A configuration value is invalid or inconsistent."""


class DataError(DistilleryError):
    """A dataset source is missing, empty or unusable."""


class TeacherError(DistilleryError):
    """A teacher cannot be found or loaded, or does not fit the student."""


class CacheError(DistilleryError):
    """A cache is missing, damaged, from a newer schema, or made by other settings."""


class RegistryError(DistilleryError):
    """A registry entry is missing, or an immutable version would be overwritten."""


class RunLockedError(DistilleryError):
    """Another run holds the lock of this run id."""
