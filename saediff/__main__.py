"""``python -m saediff ...`` runs the command line (``torchrun -m saediff ...`` and
``accelerate launch -m saediff ...`` need a module to run):

    python -m saediff --help
"""

from saediff.cli.app import main

main()
