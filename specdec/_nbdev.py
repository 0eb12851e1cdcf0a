"""An nbdev export setting that `pyproject.toml` cannot express, loaded through `export_procs` there.

nbdev wraps a module's `__all__` at 120 characters and only then prefixes `__all__ = `, so its first line reaches 130.
Exported code stays within 120 characters (`.ci/check_lines`): the wrapper nbdev's module maker uses is made 10
characters narrower, the room that prefix takes."""
import textwrap
import nbdev.maker

class AllWrapper(textwrap.TextWrapper):
    "nbdev's `__all__` wrapper, narrower by the `__all__ = ` it prefixes to the first line."
    def __init__(self, width:int=70, **kwargs): super().__init__(width=width - len("__all__ = "), **kwargs)

nbdev.maker.TextWrapper = AllWrapper      # the name nbdev.maker wraps `__all__` with, and nothing else

def narrow_all(cell) -> None:
    "The export processor `pyproject.toml` names: it changes no cell; importing this module is the setting."
