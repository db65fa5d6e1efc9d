"""glance_lightning: train Glance Slow/Fast LoRAs for flow-matching image models with PyTorch Lightning."""

__version__ = "0.1.0"
