"""pgolf_lit: the OpenAI Parameter Golf record systems as a PyTorch Lightning + Fabric package."""

__version__ = "0.1.0"
