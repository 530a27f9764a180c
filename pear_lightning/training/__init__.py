"""training: the SFT step. The LightningModule (``module``) scores a batch on ``model``'s log-prob path, hands the
log-probs to a weighting strategy and reduces its token losses (``loss``), keeps the optimizer step's books
(``step``), logs diagnostics and watches the clips (``diagnostics``), builds the schedule (``schedule``), the
distillation KL (``distill``), evaluation callbacks (``evaluate``) and the console (``console``); ``export`` and
``inspect`` are the commands that work on a trained module. It imports ``model``, ``data``, the ground floor and
``pear_lightning.strategies``, never ``behavior`` or ``cli``."""
