import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The tiny model is built into a per-session cache, never the user's."""
    os.environ.setdefault("PATHVLM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset made by the real preparation script (real IHC patches)."""
    from data.demo.prepare import main

    out = tmp_path_factory.mktemp("demo")
    main(["--out", str(out), "--sft-size", "48", "--rl-size", "24", "--test-size", "24"])
    return str(out)
