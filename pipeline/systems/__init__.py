"""LightningModules: what is trained and how (losses, metrics, decoding, the optimiser), over the models of :mod:`pipeline.models` and the data of :mod:`pipeline.datasets`."""
