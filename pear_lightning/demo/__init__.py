"""The embedded demo: a verifiable arithmetic task, its tokenizer, models and behaviour-policy data, and its config."""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent
CONFIG = HERE / "config.yaml"
PATH_KEYS = {"model": ("model_name_or_path",), "data": ("train_path", "val_path", "test_path", "predict_path")}


def demo_config() -> str:
    """The demo config as YAML text, with its paths to the package's own files (``pear_lightning/...``) made
    absolute unless they exist as given, so that ``--config demo`` runs from any folder."""
    config = yaml.safe_load(CONFIG.read_text())
    package_root = HERE.parent.parent
    for section, keys in PATH_KEYS.items():
        for key in keys:
            value = config.get(section, {}).get(key)
            if isinstance(value, str) and value.startswith("pear_lightning/") and not Path(value).exists():
                config[section][key] = str(package_root / value)
    return yaml.safe_dump(config, sort_keys=False)
