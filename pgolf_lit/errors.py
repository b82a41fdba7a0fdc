"""One error type for bad input: the CLI prints its message as one line and exits non-zero."""


class PgolfError(Exception):
    """A user-facing error. The message names the file or field at fault and what was expected."""


class ConfigError(PgolfError, ValueError):
    """An invalid configuration value (names the field)."""


class DataError(PgolfError, ValueError):
    """Bad data on disk: a shard, a tokenizer, a data directory (names the file)."""


class ArtifactError(PgolfError, ValueError):
    """A truncated, corrupted, mismatched or over-budget artifact (names the file)."""


class CheckpointError(PgolfError, ValueError):
    """A missing, truncated, corrupted or mismatched checkpoint, or one that cannot be written (names the file)."""


def error_line(e: BaseException) -> str:
    """The one line for a PgolfError (its message) or an OSError (its path, then the reason)."""
    if isinstance(e, OSError) and not isinstance(e, PgolfError):
        what = e.strerror or str(e).strip() or type(e).__name__
        return f"{e.filename}: {what}" if e.filename else what
    return str(e)
