from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pandas as pd
import pytest

from instances import load_scm
from models.scm import ModelFileError, StructuralCausalModel
from tests.conftest import SHARED_DATA

LOAN = ("gender", "age", "education", "loan_amount", "loan_duration", "income", "savings")


def sigma(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_loan_features_in_carma_order(loan_scm) -> None:
    assert loan_scm.names == LOAN
    assert loan_scm.actionable == ("education", "loan_amount", "income", "savings")


def test_loan_equations_on_a_hand_computed_row(loan_scm) -> None:
    # gender 1, age noise 40 (age 5), the other noises below, computed by hand from DOMAIN.md.
    u = np.array([1.0, 40.0, 0.2, -1.0, 0.5, 1.5, 2.0])
    age = -35 + 40
    education = -0.5 + sigma(-1 + 0.5 * 1 + sigma(0.1 * age) + 0.2)
    loan = 1 + 0.01 * (age - 5) * (5 - age) + (1 - 1) - 1.0
    duration = -1 + 0.1 * age + 2 * (1 - 1) + loan + 0.5
    income = -4 + 0.1 * (age + 35) + 2 * 1 + 1 * education + 1.5
    savings = -4 + 1.5 * max(income, 0) + 2.0
    expected = [1, age, education, loan, duration, income, savings]
    np.testing.assert_allclose(loan_scm.generate(u[None, :])[0], expected, atol=1e-12)
    np.testing.assert_allclose(loan_scm.abduct_noise(np.array([expected]))[0], u, atol=1e-12)
    score = -loan - duration + income + savings + income * savings  # I, S >= 0: sign +1
    assert loan_scm.label(np.array([expected]))[0] == float(sigma(0.3 * score) >= 0.5)


def test_loan_label_sign_factor_when_income_is_negative(loan_scm) -> None:
    row = np.array([[0, 0, 0, 1.0, 1.0, -2.0, 3.0]])
    # a = -1 because income < 0: score = -1 - 1 - 2 + 3 - (-2 * 3) = 5 -> accepted
    assert loan_scm.label(row)[0] == 1.0


def test_counterfactual_moves_descendants_only(loan_scm) -> None:
    x, _ = loan_scm.sample(5, 0)
    do_income = np.zeros_like(x, dtype=bool)
    do_income[:, 5] = True
    values = np.zeros_like(x)
    values[:, 5] = x[:, 5] + 3.0
    cf = loan_scm.propagate_counterfactual(x, do_income, values)
    np.testing.assert_allclose(cf[:, :5], x[:, :5])
    np.testing.assert_allclose(cf[:, 5], x[:, 5] + 3.0)
    u = loan_scm.abduct_noise(x)
    np.testing.assert_allclose(cf[:, 6], -4 + 1.5 * np.maximum(cf[:, 5], 0) + u[:, 6])


def test_sampling_is_seeded(loan_scm) -> None:
    np.testing.assert_array_equal(loan_scm.sample(50, 3)[0], loan_scm.sample(50, 3)[0])


@pytest.fixture(scope="module")
def carma_rows() -> pd.DataFrame:
    path = SHARED_DATA / "carma_loan_test.csv"
    if not path.exists():
        pytest.skip(f"{path} is not beside the checkout")
    return pd.read_csv(path)


def test_regenerates_carmas_published_rows(loan_scm, carma_rows) -> None:
    x = carma_rows[list(LOAN)].to_numpy()
    u = carma_rows[[f"u_{n}" for n in LOAN]].to_numpy()
    assert len(x) == 5000
    np.testing.assert_allclose(loan_scm.generate(u), x, atol=1e-5)
    np.testing.assert_allclose(loan_scm.abduct_noise(x), u, atol=1e-5)
    np.testing.assert_array_equal(loan_scm.label(x), carma_rows["label"].to_numpy())


def test_karimi_variant_differs_where_documented() -> None:
    carma, karimi = load_scm("loan"), load_scm("loan", variant="karimi")
    u = carma.sample_noise(200, 1)
    a, b = carma.generate(u), karimi.generate(u)
    women = u[:, 0] == 0
    np.testing.assert_allclose(a[:, :3], b[:, :3])
    np.testing.assert_allclose(a[~women, 3] - 0.0, b[~women, 3] - 1.0)  # (1 - G) vs G
    assert karimi.label_spec.kind == "probability"
    with pytest.raises(ValueError, match="seed"):
        karimi.label(b)


def _document() -> dict:
    return copy.deepcopy(load_scm("loan")._document)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["variables"][2].update(role="boss"), "'role' of variable 'education'"),
        (lambda d: d["variables"][2].update(bounds=[1, 0]), "'bounds' of variable 'education'"),
        (lambda d: d["variables"][5].update(equation="income2 + noise"), "not defined before"),
        (lambda d: d["variables"][3].update(equation="1 + age"), "exactly once"),
        (lambda d: d["variables"][1].update(equation="-35 + noise + loan_amount"), "not defined"),
        (lambda d: d["variables"][4].update(role="immutable"), "'immutable' but depends"),
        (lambda d: d["variables"][0]["noise"].update(p=float("nan")), "'noise.p'"),
        (lambda d: d.update(schema_version=7), "schema_version"),
        (lambda d: d["variables"][6].update(equation="__import__('os')"), "not allowed"),
    ],
)
def test_model_file_errors_name_the_field(edit, message) -> None:
    document = _document()
    edit(document)
    with pytest.raises(ModelFileError, match=message):
        StructuralCausalModel.from_dict(document)


def test_a_model_survives_pickling(loan_scm) -> None:
    x, noise = loan_scm.sample(3, 0)
    again = pickle.loads(pickle.dumps(loan_scm))
    assert again.generate(noise).tobytes() == x.tobytes()
    assert again.abduct_noise(x).tobytes() == loan_scm.abduct_noise(x).tobytes()
