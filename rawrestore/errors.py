"""User-facing errors of rawrestore; all derive from `isp.errors.InputError` (exit code 2)."""
from isp.errors import InputError, RawReadError


class ConfigError(InputError):
    """A config key, type or value that is wrong; the message names the key."""


class DataError(InputError):
    """A dataset, manifest or pair that cannot be used as given."""


class WeightsError(InputError):
    """Pretrained weights that are missing or do not fit; the message says how to get them."""


__all__ = ["InputError", "RawReadError", "ConfigError", "DataError", "WeightsError"]
