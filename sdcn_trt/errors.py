"""The package's exception types: each says what was wrong and what was expected."""


class SdcnError(Exception):
    """Base class of every error sdcn_trt raises on purpose."""


class InputError(SdcnError, ValueError):
    """A bad argument or input file: an image, a setting, a prompt, a shape."""


class WeightsError(SdcnError, RuntimeError):
    """Model weights that are missing, unreadable or do not match their configuration."""


class BackendUnavailableError(SdcnError, RuntimeError):
    """A backend whose packages or hardware are missing; the message says how to get them."""


class DeviceMemoryError(SdcnError, RuntimeError):
    """The GPU ran out of memory building or capturing something; the message says what and at which shape."""


class CompileError(SdcnError, RuntimeError):
    """torch.compile failed on a network; the message names the network, the mode and the cause."""
