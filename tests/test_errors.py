"""The ground floor's ``errors``: which model and data names are hub names (left to the hub) and which can only be
local paths (refused at once when missing, before the hub's retries)."""

import pytest

from pear_lightning.errors import PearError, looks_local, refuse_missing

HUB = ["Qwen/Qwen2.5-1.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "meta-llama/Llama-3.1-8B"]
LOCAL = ["./model", "/abs/model", "~/model", "runs/pear/version_0", "../up"]


@pytest.mark.parametrize("name", HUB)
def test_a_hub_name_stays_a_hub_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder shares its first part
    assert not looks_local(name)
    refuse_missing("model.model_name_or_path", name)  # left to the hub: not refused here


@pytest.mark.parametrize("name", LOCAL)
def test_a_missing_local_path_is_refused_at_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_local(name)
    with pytest.raises(PearError) as refused:
        refuse_missing("model.model_name_or_path", name)
    assert str(refused.value) == f"model.model_name_or_path={name!r}: no such folder"


def test_an_org_name_that_is_a_local_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("models/Typo") and not looks_local("Qwen/Qwen2.5-1.5B")
