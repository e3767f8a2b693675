"""``python -m diffattn.cli ...`` (e.g. under ``torchrun`` / ``accelerate launch`` for ``headhunt``)."""
from . import main

main()  # a command's return value is for callers of main(), not an exit status
