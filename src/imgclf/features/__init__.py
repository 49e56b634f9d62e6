"""Features: batched, cached backbone embeddings on a fast runtime."""

from imgclf.features.extract import FeatureCache, FeatureExtractor, FeatureResult, default_cache_dir
from imgclf.features.runtimes import create_runtime, export_onnx

__all__ = ["FeatureCache", "FeatureExtractor", "FeatureResult", "create_runtime", "default_cache_dir", "export_onnx"]
