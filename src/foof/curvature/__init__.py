"""Per-layer curvature blocks built from captured statistics."""

from foof.curvature.linalg import damped_inverse, second_moment, update_ema_

__all__ = ["damped_inverse", "second_moment", "update_ema_"]
