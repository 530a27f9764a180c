"""``python -m pear_lightning``: see ``pear_lightning.cli.commands``."""

from pear_lightning.cli.commands import main

if __name__ == "__main__":
    main()
