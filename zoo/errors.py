"""The project's exception hierarchy.

Every error a user can cause is one of these, so callers can catch ``ZooError`` and the
CLI can turn it into a one-line message with a non-zero exit code. Each message names what
was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CurvatureError",
    "CurvatureMissingError",
    "DataError",
    "HubError",
    "NonFiniteError",
    "UnknownNameError",
    "ZooError",
]


class ZooError(Exception):
    """Base class of every error raised on purpose by zoo."""


class ConfigError(ZooError, ValueError):
    """A recipe, option or configuration value is invalid."""


class UnknownNameError(ZooError, KeyError):
    """A registry lookup failed; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class DataError(ZooError):
    """A dataset could not be found, read or downloaded."""


class CheckpointError(ZooError):
    """A checkpoint folder is missing, corrupt or disagrees with its config."""


class HubError(ZooError):
    """A Hugging Face Hub operation failed (missing repo, revision, token, network)."""


class CurvatureError(ZooError):
    """The curvature pass cannot handle a model, operation or loss."""


class CurvatureMissingError(CurvatureError):
    """A second-order optimizer was stepped without second derivatives."""


class NonFiniteError(ZooError):
    """Training produced NaN or infinity where it must not."""
