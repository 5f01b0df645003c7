"""Numbers at the edges of JSON: infinities and integers too large for a float."""

from __future__ import annotations

import pytest

from shared.errors import JobSpecError
from shared.spec import load_job_message

PREFIX = '{"job_id": "edge", "model": {"name": "logistic_regression"}, "data": {"path": "train.svm"}, '


@pytest.mark.parametrize("section, text, field", [
    ("training", '{"n_workers": 1e999}', "training.n_workers"),
    ("training", '{"n_workers": ' + "9" * 400 + "}", "training.n_workers"),
    ("training", '{"seed": -Infinity}', "training.seed"),
    ("optimizer", '{"learning_rate": Infinity}', "optimizer.learning_rate"),
    ("optimizer", '{"learning_rate": NaN}', "optimizer.learning_rate"),
    ("optimizer", '{"learning_rate": ' + "9" * 400 + "}", "optimizer.learning_rate"),
])
def test_non_finite_number_rejected(section, text, field):
    with pytest.raises(JobSpecError) as raised:
        load_job_message(PREFIX + f'"{section}": {text}}}')

    assert raised.value.field == field


def test_integral_float_accepted_as_integer():
    spec = load_job_message(PREFIX + '"training": {"n_workers": 4.0}}')

    assert spec.training.n_workers == 4
    assert isinstance(spec.training.n_workers, int)


@pytest.mark.parametrize("text, words", [
    ('{"n_workers": true}', "expected an integer, got true"),
    ('{"learning_rate": 1e400}', "a number beyond the float range (read as infinity)"),
])
def test_message_shows_json_words(text, words):
    section = "optimizer" if "learning_rate" in text else "training"
    with pytest.raises(JobSpecError) as raised:
        load_job_message(PREFIX + f'"{section}": {text}}}')

    assert words in str(raised.value)
