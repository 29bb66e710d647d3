"""train.py with every checkpoint array write slowed down, so a test can kill it mid-save.

Usage: python tests/slow_save_train.py [train.py flags]
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

import tensorstore  # noqa: E402
from absl import app  # noqa: E402

import train  # noqa: E402

_open = tensorstore.open


def slow_open(*args, **kwargs):
    time.sleep(0.2)
    return _open(*args, **kwargs)


tensorstore.open = slow_open

if __name__ == "__main__":
    app.run(train.main)
