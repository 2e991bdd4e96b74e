"""An unknown --special_text names a few of the tokenizer's special strings, not thousands (Gemma's
<unusedN>): the one-line error stays readable."""

import pytest

from recipes.common import models


def test_an_unknown_special_text_names_a_few_of_thousands(monkeypatch):
    many = tuple(f"<unused{i}>" for i in range(3000))
    monkeypatch.setattr(models, "special_strings", lambda tokenizer: many)
    with pytest.raises(ValueError) as e:
        models.text_reserved(None, ["<box>"])
    message = str(e.value)
    assert "<unused0>" in message and "<unused2999>" not in message and "3000 in all" in message
    assert len(message) < 600
