"""Exceptions of the solver. Hosts catch `EraserError` at their boundary and show its message."""


class EraserError(Exception):
    """Base of every error whose message is meant for the user."""


class InvalidParameterError(EraserError, ValueError):
    """A setting or input is out of range; the message names the field and what is allowed. Hosts that show
    the field their own way read `field` (the solver's name for it) and `detail` (the message without it)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class UnsupportedModelError(EraserError):
    """The checkpoint's key layout is not one the solver can edit. `slot`: the text-encoder slot at fault
    ("clip_l", "clip_g", "t5xxl"), where one is, so a host can name the file it took that encoder from."""

    def __init__(self, message: str, slot: str | None = None):
        self.slot = slot
        super().__init__(message)


class ErasureFileError(UnsupportedModelError):
    """A saved erasure (patch or LoRA) given where a checkpoint is expected. `kind` is its format; `advice` says
    what to do with it instead: the command line's unless a host words its own."""

    NAMES = {"patch": "patch", "lora": "erasure LoRA"}
    ADVICE = {"patch": "use `apply` to put it on its checkpoint",
              "lora": "load it with a LoRA loader on top of its checkpoint"}

    def __init__(self, kind: str, advice: str | None = None):
        self.kind = kind
        super().__init__(f"this file is a Concept Eraser {self.NAMES[kind]}, not a checkpoint: "
                         f"{advice or self.ADVICE[kind]}")


class UnsafeFileError(EraserError):
    """The file is not safetensors (a pickle checkpoint, or not a model at all)."""


class NonFiniteResultError(EraserError):
    """The solve produced NaN or Inf; nothing was written or patched."""


class Cancelled(EraserError):
    """The user stopped the run; nothing was written or patched."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before reaching its tolerance; the result
    is usable but not the exact optimum."""
