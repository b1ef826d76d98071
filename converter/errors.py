"""Why a conversion was refused; every message names the image and layer concerned."""


class ConversionError(Exception):
    """The image cannot be converted; nothing was pushed."""
