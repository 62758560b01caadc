"""The one base class of every error this package raises on purpose."""


class NVFP4Error(Exception):
    """A problem with the input, the options or the environment, described for the user."""
