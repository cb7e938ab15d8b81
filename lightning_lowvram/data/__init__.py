"""LightningDataModules for the data users bring from the command line (``data=text_file``)."""

from lightning_lowvram.data.text_file import TextFileDataModule

__all__ = ["TextFileDataModule"]
