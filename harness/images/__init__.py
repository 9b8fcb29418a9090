"""Guest OS images: definitions in images/guest/*.toml, built with mmdebstrap + buildah, cached."""

from harness.images.build import GuestImage, ImageBuilder
from harness.images.definitions import DefinitionError, load_base, load_variant, variant_names

__all__ = ["DefinitionError", "GuestImage", "ImageBuilder", "load_base", "load_variant", "variant_names"]
