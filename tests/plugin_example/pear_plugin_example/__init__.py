"""An example pear_lightning plugin: a weighting under which every sequence counts the same."""

from torch import Tensor

from pear_lightning.strategies import TokenBatch, WeightingStrategy


class LengthNormalizedSFT(WeightingStrategy):
    """Token weight 1 / (number of loss tokens of its row), so long responses do not dominate the batch.

    With ``--model.loss_normalizer weights`` the loss is the mean over rows of each row's mean NLL.
    """

    def weights(self, batch: TokenBatch) -> Tensor:
        """1 / T_row on loss tokens, 0 elsewhere."""
        mask = batch.mask.float()
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
