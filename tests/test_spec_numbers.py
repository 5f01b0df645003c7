"""Numbers at the edges of JSON: infinities, integers too large for a float, floats in integer fields."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from shared import json_numbers
from shared.errors import JobSpecError
from shared.spec import load_job_message, shown

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


@pytest.mark.parametrize("section, text, words", [
    ("training", '{"n_workers": 2.0}', "'training.n_workers': expected an integer, got 2.0; write 2"),
    ("training", '{"seed": 7.0}', "'training.seed': expected an integer, got 7.0; write 7"),
    ("training", '{"seed": -0.0}', "'training.seed': expected an integer, got -0.0; write 0"),
    ("training", '{"batch_size": 2.5}', "'training.batch_size': expected an integer, got 2.5; write 2 or 3"),
    ("optimizer", '{"step_size": 1e3}', "'optimizer.step_size': expected an integer, got 1e3; write 1000"),
    ("optimizer", '{"step_size": 1e300}',
     "'optimizer.step_size': expected an integer, got 1e300; write the integer with digits only, without a "
     "decimal point or exponent"),
])
def test_float_rejected_for_integer(section, text, words):
    with pytest.raises(JobSpecError) as raised:
        load_job_message(PREFIX + f'"{section}": {text}}}')

    assert words in str(raised.value)


@pytest.mark.parametrize("section, text, words", [
    ("training", '{"seed": 1e30}', "'training.seed': got 1e30; must be at most 4294967295"),
    ("training", '{"n_workers": 1e300}', "'training.n_workers': got 1e300; must be at most 1000"),
    ("training", '{"max_epochs": Infinity}', "'training.max_epochs': got Infinity; must be at most 10000"),
    ("training", '{"seed": -Infinity}', "'training.seed': got -Infinity; must be at least 0"),
    ("optimizer", '{"learning_rate": 1e400}', "'optimizer.learning_rate': got 1e400; must be at most 1000.0"),
    ("optimizer", '{"learning_rate": NaN}', "'optimizer.learning_rate': expected a number, got NaN"),
    ("training", '{"n_workers": ' + "1" * 5000 + "}",
     "'training.n_workers': got 11111111111111111111... (5000 digits); must be at most 1000"),
    ("training", '{"seed": -' + "1" * 5000 + "}",
     "'training.seed': got -1111111111111111111... (5000 digits); must be at least 0"),
    ("optimizer", '{"step_size": ' + "1" * 5000 + "}",
     "'optimizer.step_size': got 11111111111111111111... (5000 digits); Baton reads integers of at most 4300 "
     "digits"),
    ("optimizer", '{"decay": ' + "9" * 400 + "}",
     "'optimizer.decay': got 99999999999999999999... (400 digits), beyond the float range"),
])
def test_message_shows_number_as_typed(section, text, words):
    with pytest.raises(JobSpecError) as raised:
        load_job_message(PREFIX + f'"{section}": {text}}}')

    message = str(raised.value)
    assert words in message
    assert len(message) < 200
    assert "set_int_max_str_digits" not in message


def test_huge_class_weight_rejected():
    body = ('{"job_id": "edge", "model": {"name": "logistic_regression", "class_weight": {"1": ' + "9" * 400 +
            '}}, "data": {"path": "train.svm"}}')

    with pytest.raises(JobSpecError) as raised:
        load_job_message(body)

    assert "class '1' has weight 99999999999999999999... (400 digits)" in str(raised.value)


@pytest.mark.parametrize("text, words", [
    ('"training": {"n_workers": true}}', "expected an integer, got true"),
    ('"training": {"n_workers": {"x": 1}}}', 'expected an integer, got {"x": 1}'),
    ('"training": {"n_workers": [1, 2]}}', "expected an integer, got [1, 2]"),
    ('"training": {"n_workers": "4"}}', "expected an integer, got '4'; write 4 without quotes"),
    ('"optimizer": {"name": "sgd", "learning_rate": "0.1"}}',
     "expected a number, got '0.1'; write 0.1 without quotes"),
    ('"training": {"local_epoch": "true"}}', "expected true or false, got 'true'; write true without quotes"),
    ('"training": 1}', "'training': expected an object, got 1"),
    ('"training": "fast"}', "'training': expected an object, got 'fast'"),
])
def test_message_shows_json_words(text, words):
    with pytest.raises(JobSpecError) as raised:
        load_job_message(PREFIX + text)

    assert words in str(raised.value)


def test_root_message_shows_json_words():
    with pytest.raises(JobSpecError) as raised:
        load_job_message("[1, 2]")

    assert "expected a JSON object, got [1, 2]" in str(raised.value)


@pytest.mark.parametrize("value, expected", [
    (2, "2"),
    (10**400, "10000000000000000000... (401 digits)"),
    (10**5000, "an integer of more than 4300 digits"),
    (float("inf"), "a number beyond the float range (read as infinity)"),
    ("x" * 100, "'" + "x" * 60 + "'... (100 characters)"),
    ({"a": [1, None, True]}, '{"a": [1, null, true]}'),
    ({"a": "x" * 100}, '{"a": "' + "x" * 53 + "... (109 characters of JSON)"),
], ids=["int", "long-int", "int-over-str-limit", "infinity", "long-string", "object", "long-object"])
def test_shown_value(value, expected):
    assert shown(value) == expected


@pytest.mark.parametrize("text", ["-12", "1e30", "2.0", "Infinity", "NaN", "9" * 5000],
                         ids=["negative-int", "exponent", "whole-float", "infinity", "nan", "oversized-int"])
def test_decoded_number_keeps_text(text):
    number = json_numbers.loads(text)

    assert shown(number) == json_numbers.shortened_number(text)
    assert shown(copy.deepcopy(number)) == shown(number)
    assert shown(pickle.loads(pickle.dumps(number))) == shown(number)


def test_decoded_numbers_encode_as_plain_json():
    decoded = json_numbers.loads('{"a": 1e30, "b": 2.50, "c": 7}')

    assert json.dumps(decoded) == '{"a": 1e+30, "b": 2.5, "c": 7}'
