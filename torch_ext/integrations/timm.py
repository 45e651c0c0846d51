"""timm's activation layers (timm/layers/activations.py) that compute one of FusedLinear's
activations; fuse() also checks each numerically before fusing it."""
MODULE_PREFIX = "timm."

ACTIVATIONS = {
    "GELU": ("gelu", 0.01),
    "GELUTanh": ("gelu_tanh", 0.01),
    "Swish": ("silu", 0.01),
    "Sigmoid": ("sigmoid", 0.01),
    "Tanh": ("tanh", 0.01),
    "QuickGELU": ("quick_gelu", 0.01),  # the OpenAI CLIP ViTs' (vit_*_clip_quickgelu_*)
}
