"""Model families: one LightningModule per diffusers pipeline family."""
