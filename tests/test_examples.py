"""The README's training example runs and every method's loss falls."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_methods.py"


def test_train_methods_losses_fall(capsys):
    spec = importlib.util.spec_from_file_location("train_methods", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(["--steps", "12", "--length", "40"])
    assert set(history) == set(module.DEFAULT_METHODS)
    for method, losses in history.items():
        assert losses[-1] < losses[0] - 0.1, (method, losses)
    assert "rec2pm-o" in capsys.readouterr().out
