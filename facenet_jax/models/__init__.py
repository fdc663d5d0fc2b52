"""Models: the backbone registry, ResNet and ViT streams, FACENet."""

from facenet_jax.models.facenet import FACENet, ModelOutput
from facenet_jax.models.resnet import ResNet, RESNET_SPECS, stage_channels
from facenet_jax.models.vit import ViT

__all__ = ["FACENet", "ModelOutput", "ResNet", "RESNET_SPECS", "ViT",
           "stage_channels"]
