"""Errors a user can cause. Each message says what happened and what to do about it."""


class LmforgeError(Exception):
    """Base class of every error lmforge raises on purpose (bad input, unsupported op, bad artifact)."""


class CaptureError(LmforgeError):
    """The model could not be captured into the IR (torch.export refused it, or an input is not a tensor)."""


class VerifyError(LmforgeError):
    """A graph broke an IR invariant (undefined value, wrong type, unknown op or attribute)."""


class UnsupportedOpError(LmforgeError):
    """No backend (not even the torch reference) can run an op."""


class TargetError(LmforgeError):
    """An unknown target, or a target this artifact / kernel was not built for."""


class ArtifactError(LmforgeError):
    """An exported artifact is missing, corrupt, tampered with or of an unknown schema."""


class WorkloadError(LmforgeError):
    """A workload file or `module:function` reference could not be loaded."""
