"""Lightning data modules for Glance training (installed as ``glance_lightning.datamodules``)."""
