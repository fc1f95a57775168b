"""``python -m attention_ext.info``: the environment report (attention_ext.info(), in _info.py)."""

import sys
import types

from ._info import info, report  # noqa: F401


class _CallableModule(types.ModuleType):
    # `import attention_ext.info` rebinds the package's `info` to this module: calling it
    # must still run the report
    def __call__(self, file=None):
        return info(file)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    info()
