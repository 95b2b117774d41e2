"""Small Hugging Face DETR-family models built from configuration (random weights, nothing
downloaded), for tests that need a real one quickly."""

from __future__ import annotations

from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

SMALL_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
SMALL_DECODER = dict(
    d_model=32,
    decoder_layers=2,
    decoder_ffn_dim=64,
    decoder_attention_heads=4,
    num_queries=30,
    num_labels=6,
)


def small_detr() -> DetrForObjectDetection:
    """A DETR of a four-stage basic ResNet (16-128 channels), one encoder layer, 30 queries, 6 labels."""
    backbone = ResNetConfig(**SMALL_RESNET, layer_type="basic", out_features=["stage4"])
    return DetrForObjectDetection(
        DetrConfig(
            use_pretrained_backbone=False,
            use_timm_backbone=False,
            backbone_config=backbone,
            encoder_layers=1,
            encoder_ffn_dim=64,
            encoder_attention_heads=4,
            **SMALL_DECODER,
        )
    )
