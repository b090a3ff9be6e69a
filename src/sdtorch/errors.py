"""The one exception family sdtorch raises for bad input.

Every message says what was wrong and, where there is one, what to do about it.
"""


class SdtorchError(Exception):
    """Base class of every error sdtorch raises on purpose."""


class CheckpointError(SdtorchError):
    """A checkpoint could not be read: missing, corrupt, unsafe, or of an unknown layout."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint asked to run code or build objects outside the tensor allow-list."""


class ArchitectureError(CheckpointError):
    """The tensors do not describe a model sdtorch knows (or do not match the chosen config)."""


class MissingKeysError(ArchitectureError):
    """The checkpoint lacks tensors the model needs."""

    def __init__(self, part: str, missing: list[str]):
        self.part = part
        self.missing = list(missing)
        shown = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
        super().__init__(f"{part}: checkpoint is missing {len(self.missing)} tensor(s): {shown}")


class InvalidInputError(SdtorchError, ValueError):
    """An argument is out of range or malformed (size, prompt, sampler name, ...)."""


class NonFiniteError(SdtorchError):
    """A model produced NaN or inf (float16 overflow that float32 did not cure, broken weights, diverged sampling)."""
