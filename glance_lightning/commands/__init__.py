"""The project's own commands beside LightningCLI's: ``schedule``, ``sample``, ``validate-data``."""
