"""Backbones: pretrained networks that turn images into feature vectors."""

from imgclf.backbones.factory import Backbone, BackboneError, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "BackboneError", "create_backbone", "list_backbones", "register_backbone"]
