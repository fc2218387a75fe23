"""ComfyUI runs this before importing torch (main.py execute_prestartup_script)."""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from comfy_multigpu.prestartup import run  # noqa: E402

run()
