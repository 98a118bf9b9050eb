"""Errors shared across the control plane's edges."""


class CliError(Exception):
    """An error the user can act on; the CLI prints it without a traceback."""
