"""One module per supported Hugging Face model family; importing this package imports every module in
it, and each registers its family (`moeray.models.family.register`): a new family is a new module here."""

import importlib
import pkgutil


def import_all() -> None:
    """Import every module of this package (again a no-op for those already imported)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


import_all()
