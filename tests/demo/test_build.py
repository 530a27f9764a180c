"""What the demo ships (built by ``pear_lightning.demo.build``): small fp32 Llamas, and behaviour-policy data whose
log-probs are the behaviour model's own."""

import json

import pytest
import torch
from conftest import BEHAVIOR, DEMO

from pear_lightning import PearDataModule, PearModule
from pear_lightning.behavior.score import prediction_rows


def test_shipped_logprobs_are_the_behaviour_policy_s_own():
    """Scoring the demo data with the behaviour model through PearModule reproduces its log-probs."""
    data = PearDataModule(
        val_path=str(DEMO / "data" / "val.jsonl"), tokenizer_name_or_path=str(BEHAVIOR), batch_size=16
    )
    data.setup("validate")
    module = PearModule(str(BEHAVIOR))
    module.configure_model()
    module.eval()
    shipped = {json.loads(line)["id"]: json.loads(line) for line in open(DEMO / "data" / "val.jsonl")}
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        scored = prediction_rows(module.predict_step(batch, 0))
    for row in scored:
        assert row["token_ids"] == shipped[row["id"]]["token_ids"]
        torch.testing.assert_close(
            torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]), rtol=0, atol=1e-5
        )
    # The data is what PEAR is for: sampled, not argmax, so the behaviour policy was uncertain somewhere.
    assert min(lp for row in scored for lp in row["logprobs"]) < -0.5


@pytest.mark.parametrize("name", ["behavior", "student"])
def test_demo_models_are_small_fp32_llamas(name):
    config = json.loads((DEMO / "assets" / name / "config.json").read_text())
    assert config["model_type"] == "llama"
    size = sum(p.stat().st_size for p in (DEMO / "assets" / name).iterdir())
    assert size < 3_000_000
