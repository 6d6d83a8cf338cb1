"""The torch side: everything that runs or reads the model. The only code that imports torch."""
