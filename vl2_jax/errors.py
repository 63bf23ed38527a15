"""Exceptions raised by vl2_jax."""


class VL2Error(Exception):
    """Base class of every error that vl2_jax raises on purpose."""


class ConfigError(VL2Error):
    """A configuration file is missing, malformed or describes something unsupported."""


class CheckpointError(VL2Error):
    """A checkpoint is missing, incomplete or does not match its configuration."""


class InputError(VL2Error):
    """A conversation, image or batch given by the caller is invalid."""
