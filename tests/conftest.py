import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from public_data import data_dir as _find_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark data directory: the shared public files, or a made-up set in their
    formats where this clone has none (see public_data.py)."""
    return _find_data_dir(tmp_path_factory.mktemp("data"))
