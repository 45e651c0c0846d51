"""open_clip's activation layers (open_clip/transformer.py) that compute one of FusedLinear's
activations; fuse() also checks each numerically before fusing it."""
MODULE_PREFIX = "open_clip."

ACTIVATIONS = {
    "QuickGELU": ("quick_gelu", 0.01),  # the models of OpenAI's CLIP weights (ViT-B-32-quickgelu, ...)
}
