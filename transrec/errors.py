"""Errors shared by every package of transrec (the command line prints a UserError as one line)."""


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, bad file): printed as one line."""


class DataError(UserError):
    """A structural problem with a dataset (manifest, schema version, shards): names the file."""


class ConfigError(UserError):
    """An invalid configuration value or an unknown key."""
