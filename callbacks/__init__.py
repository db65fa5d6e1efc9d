"""Lightning callbacks for Glance training (installed as ``glance_lightning.callbacks``)."""
