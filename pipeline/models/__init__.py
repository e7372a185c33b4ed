"""Plain ``torch.nn`` modules (no Lightning): timm backbones and their weights, temporal heads, forecasting cores and the caption decoder."""
