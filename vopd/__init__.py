"""Vision-OPD: on-policy self-distillation from a crop-conditioned teacher to a full-image student."""

__version__ = "0.1.0"
