"""The commands beside LightningCLI's own (``fit``, ``validate``, ``test``, ``predict``): one module each, with a
``run(args)`` entry point that ``pear_lightning.cli`` dispatches to."""
