"""Model-inversion attacks on split image classifiers; importing this package registers all of them."""

from splitveil.attack.image.base import IMAGE_ATTACKS, ImageAttack, ImageTarget
from splitveil.attack.image import cgan, inverse, rmle, shadow  # noqa: F401  (register the attacks)

__all__ = ["IMAGE_ATTACKS", "ImageAttack", "ImageTarget"]
