"""Exceptions that users see: each carries one sentence saying what is wrong, where, and what to do."""


class VL2Error(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(VL2Error):
    """config.json, the tokenizer or processor files, a dtype, moe_impl or mesh spec: missing, unknown
    or not supported."""


class CheckpointError(VL2Error):
    """A checkpoint folder, weights file, shard, tensor or converted manifest that is missing, extra,
    mis-shaped, of the wrong dtype or unreadable."""


class InputError(VL2Error):
    """An image (see `processor.open_image`), a conversation, a prompt over the context limit or a
    generation argument that cannot be processed."""


class DeviceMemoryError(VL2Error, MemoryError):
    """The accelerator ran out of memory; the message says during what and what to try."""
