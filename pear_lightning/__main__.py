"""``python -m pear_lightning``: see ``pear_lightning.cli``."""

from pear_lightning.cli import main

if __name__ == "__main__":
    main()
