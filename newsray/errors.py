"""User-facing errors: one clear sentence, printed by the CLI without a traceback."""


class NewsrayError(Exception):
    """An error the user can fix (bad config, bad data line, missing data or model)."""


class ConfigError(NewsrayError):
    """The configuration is invalid; the message names the file and the YAML path."""


class DataError(NewsrayError):
    """A data file is missing or malformed; the message names file:line and the field."""


class ModelError(NewsrayError):
    """A model cannot be resolved or prepared."""


class GenerationError(NewsrayError):
    """Constrained decoding cannot go on: a row left its grammar, or the grammar cannot be built for the tokenizer."""
