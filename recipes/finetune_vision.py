"""medcap's method (LLM frozen; the vision encoder and/or the projector train) under its own name: the same
recipe as ``finetune``, kept so that ``medcap run finetune_vision`` and ``tune run recipes/finetune_vision.py``
keep working.

    medcap run finetune_vision --config demo/finetune_vision [key=value ...]
"""

import sys

from medcap.command import run_command
from recipes.finetune import main

if __name__ == "__main__":
    sys.exit(run_command(main, distributed=True))
