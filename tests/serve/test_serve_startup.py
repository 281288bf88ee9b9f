"""What a server loads to start: the run's model and its store, not the training stack (Lightning
alone took 11 of the 17 s a server over a 100,000-vector store needed to answer its first search)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

PROBE = """
import json, sys
from finegrain.gallery.live import LiveGallery
from PIL import Image
live = LiveGallery(sys.argv[1], engine="torch")
live.search(Image.new("RGB", (40, 30)), k=1)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"lightning", "pytorch_lightning"})))
"""


def test_a_server_answers_without_importing_lightning(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = subprocess.run([sys.executable, "-c", PROBE, str(run)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], out.stdout
