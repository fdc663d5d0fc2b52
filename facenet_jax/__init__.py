"""FACENet for multi-spectral vehicle re-identification, in JAX/Flax."""

from facenet_jax.constants import FLARE_MODALITIES, MODALITIES

__all__ = ["MODALITIES", "FLARE_MODALITIES"]
