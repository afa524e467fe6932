"""Model adapters: architecture detection and text encoders built from a checkpoint's own weights."""

from .arch import ArchSpec, EncoderSpec, detect

__all__ = ["ArchSpec", "EncoderSpec", "detect"]
