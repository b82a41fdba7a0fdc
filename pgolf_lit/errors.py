"""One error type for bad input: the CLI prints its message as one line and exits non-zero."""


class PgolfError(Exception):
    """A user-facing error. The message names the file or field at fault and what was expected."""


class ConfigError(PgolfError, ValueError):
    """An invalid configuration value (names the field)."""


class DataError(PgolfError, ValueError):
    """Bad data on disk: a shard, a tokenizer, a data directory (names the file)."""


class ArtifactError(PgolfError, ValueError):
    """A truncated, corrupted, mismatched or over-budget artifact (names the file)."""
