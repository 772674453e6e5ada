"""tests/methods/ uses the helpers of tests/conftest.py. pytest imports the nearest conftest.py last under the
name ``conftest``, so ``from conftest import ...`` here (and in any test module collected after this directory)
resolves to this file: it re-exports tests/conftest.py's names, and puts tests/ on sys.path for the worker
processes the tests start."""
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for path in (str(TESTS), str(Path(__file__).resolve().parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

_spec = spec_from_file_location("tests_conftest", TESTS / "conftest.py")
_shared = module_from_spec(_spec)
sys.modules["tests_conftest"] = _shared
_spec.loader.exec_module(_shared)
# its helpers, not its pytest hooks (pytest_collection_modifyitems would run twice)
globals().update({name: value for name, value in vars(_shared).items() if not name.startswith(("__", "pytest_"))})
