"""Makes top-level packages unimportable in a child process, as if their distribution were not
installed: ``PYTHONPATH=tests/helpers/hide_modules ER_TEST_HIDE_MODULES=lightning python ...``.

The ``lightning`` distribution depends on ``pytorch-lightning``, so one environment holds both
Lightning namespaces; the tests hide one to run the other alone ("each with only its own
distribution importable")."""

import os
import sys

_HIDDEN = frozenset(n for n in os.environ.get("ER_TEST_HIDE_MODULES", "").split(",") if n)


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if _HIDDEN:
    sys.meta_path.insert(0, _Hide())
