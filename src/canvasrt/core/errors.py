"""User-facing errors. The CLI turns any `CanvasrtError` into one line on stderr and exit code 2."""


class CanvasrtError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class CheckpointError(CanvasrtError):
    """A checkpoint directory that cannot be loaded as DiffusionGemma."""


class ArtifactError(CanvasrtError):
    """An artifact directory (graphs plus manifest) that is missing, incomplete or incompatible."""
