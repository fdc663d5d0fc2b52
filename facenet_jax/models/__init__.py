"""Model registry: ResNet backbones and FACENet."""

from facenet_jax.models.facenet import FACENet, ModelOutput
from facenet_jax.models.resnet import ResNet, RESNET_SPECS, stage_channels

__all__ = ["FACENet", "ModelOutput", "ResNet", "RESNET_SPECS",
           "stage_channels"]
