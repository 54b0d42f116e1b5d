r"""Tabular files and their standardisation: every supported format round-trips, every bad
file fails before training with a message that names the problem, and the standardizer's
log-determinant is the density change it claims to be."""

import math

import numpy as np
import pytest
import torch

from pyro_flowpack.data.tabular import SUPPORTED_SUFFIXES, Standardizer, load_tabular

# Values exactly representable in float32, so round trips can be compared with ==.
DATA = np.array([[0.5, -2.0, 10.0], [1.25, 3.0, 10.5], [-0.75, 4.5, 9.0], [2.0, -1.0, 11.25]])


def _expected() -> torch.Tensor:
    return torch.from_numpy(DATA)  # float64, the precision of text, integer and float64 files


def _write_csv(path, text: str):
    path.write_text(text)
    return path


# Round trips of each format.


def test_npy_round_trips_in_the_file_s_precision(tmp_path):
    np.save(tmp_path / "x.npy", DATA)
    x = load_tabular(tmp_path / "x.npy")
    assert x.dtype == torch.float64 and x.shape == (4, 3)
    assert torch.equal(x, _expected())
    np.save(tmp_path / "single.npy", DATA.astype(np.float32))
    assert torch.equal(load_tabular(tmp_path / "single.npy"), _expected().float())
    np.save(tmp_path / "half.npy", DATA.astype(np.float16))
    assert load_tabular(tmp_path / "half.npy").dtype == torch.float32


def test_integer_npy_becomes_float64_exactly(tmp_path):
    big = np.array([[2**40 + 1, 1], [2**40 + 3, 2]], dtype=np.int64)  # float32 would round these
    np.save(tmp_path / "x.npy", big)
    x = load_tabular(str(tmp_path / "x.npy"))
    assert x.dtype == torch.float64
    assert torch.equal(x, torch.from_numpy(big).double())


def test_high_precision_csv_columns_keep_their_spread_through_standardisation(tmp_path):
    """The issue's cases: 1e7 + 0.1 N(0, 1) kept 1 of 193 distinct values when cast to
    float32 before standardising, 12345.678 +- 2e-4 kept 2. Loaded in float64 and
    standardised there, both keep every distinct value in float32 and have std 1 (1e-6)."""
    from pyro_flowpack.data import load_data

    generator = np.random.default_rng(0)
    n = 200
    table = np.stack([1e7 + 0.1 * generator.standard_normal(n), 12345.678 + 2e-4 * generator.standard_normal(n),
                      generator.standard_normal(n)], axis=1)
    path = tmp_path / "precise.csv"
    np.savetxt(path, table, delimiter=",", fmt="%.17g", header="big,fine,plain", comments="")
    data = load_data(str(path), valid_fraction=0.1, test_fraction=0.1)
    assert data.train.dtype == torch.float32
    for j in range(3):
        column = data.train[:, j]
        assert column.unique().numel() == len(column), j
        assert abs(float(column.double().std(correction=0)) - 1) < 1e-6, j
    # back in data units, in double precision: each row within 1e-6 of one of the file's
    # (float32 standardised values: 6e-8 of a standard deviation)
    back = data.standardizer.inverse(data.train)
    assert back.dtype == torch.float64
    rows = torch.from_numpy(table)
    nearest = (back[:, None, :] - rows[None, :, :]).abs().amax(-1).min(1).values
    assert float(nearest.max()) < 1e-6


def test_constant_and_collapsing_columns_are_refused_naming_the_column(tmp_path):
    from pyro_flowpack.data import load_data

    generator = np.random.default_rng(0)
    x = generator.standard_normal((100, 3))
    x[:, 1] = 5.0
    path = tmp_path / "constant.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c", comments="")
    with pytest.raises(ValueError, match=r"column 'b' \(column 1, counted from 0\) of the train split .* is "
                                         r"constant \(every row is 5.0\)"):
        load_data(str(path))
    x = generator.standard_normal((100, 2))
    x[:, 0] *= 1e-3
    x[3, 0] = 3e20  # one finite outlier squeezes the other values together
    np.save(tmp_path / "outlier.npy", x)
    with pytest.raises(ValueError, match=r"column 0 \(counted from 0\) of the train split .*: standardised "
                                         r"and cast to torch.float32, its \d+ distinct values become 2"):
        load_data(str(tmp_path / "outlier.npy"), seed=0, valid_fraction=0.0, test_fraction=0.2)


def test_npz_single_array_and_key(tmp_path):
    np.savez(tmp_path / "one.npz", data=DATA)
    assert torch.equal(load_tabular(tmp_path / "one.npz"), _expected())
    np.savez(tmp_path / "two.npz", train=DATA, other=2 * DATA)
    assert torch.equal(load_tabular(tmp_path / "two.npz", key="other"), 2 * _expected())


def test_csv_with_header_round_trips(tmp_path):
    lines = ["a,b,c"] + [",".join(str(float(v)) for v in row) for row in DATA]
    path = _write_csv(tmp_path / "x.csv", "\n".join(lines) + "\n")
    assert torch.equal(load_tabular(path), _expected())


def test_csv_without_header_keeps_first_row(tmp_path):
    lines = [",".join(str(float(v)) for v in row) for row in DATA]
    path = _write_csv(tmp_path / "x.csv", "\n".join(lines) + "\n")
    assert torch.equal(load_tabular(path), _expected())


def test_single_column_csv_is_two_dimensional(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "value\n1\n2\n3\n")
    assert torch.equal(load_tabular(path), torch.tensor([[1.0], [2.0], [3.0]]))


def test_pt_tensor_and_dicts(tmp_path):
    torch.save(_expected().double(), tmp_path / "t.pt")
    assert torch.equal(load_tabular(tmp_path / "t.pt"), _expected())
    torch.save({"x": _expected(), "meta": "not a tensor"}, tmp_path / "single.pt")
    assert torch.equal(load_tabular(tmp_path / "single.pt"), _expected())
    torch.save({"x": _expected(), "y": -_expected()}, tmp_path / "two.pt")
    assert torch.equal(load_tabular(tmp_path / "two.pt", key="y"), -_expected())


# Errors, each before any training.


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file: .*absent\.npy"):
        load_tabular(tmp_path / "absent.npy")


def test_unsupported_suffix_lists_supported_ones(tmp_path):
    (tmp_path / "x.txt").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"suffix must be one of") as error:
        load_tabular(tmp_path / "x.txt")
    assert all(suffix in str(error.value) for suffix in SUPPORTED_SUFFIXES)
    assert "'.txt'" in str(error.value)


def test_one_dimensional_array_is_refused_with_a_reshape_hint(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(5.0))
    with pytest.raises(ValueError, match=r"got a 1-D array of shape \(5,\).*reshape\(-1, 1\)"):
        load_tabular(tmp_path / "x.npy")


def test_three_dimensional_array_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match=r"expected a 2-D array .* got shape \(4, 2, 2\)"):
        load_tabular(tmp_path / "x.npy")


def test_a_single_row_is_too_few(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"at least 2 samples .* got shape \(1, 3\)"):
        load_tabular(tmp_path / "x.npy")


def test_nan_reports_count_and_first_position(tmp_path):
    data = DATA.copy()
    data[2, 1] = np.nan
    data[3, 0] = np.inf
    np.save(tmp_path / "x.npy", data)
    with pytest.raises(ValueError, match=r"2 of the 12 values are NaN or infinite") as error:
        load_tabular(tmp_path / "x.npy")
    assert "row 2, column 1" in str(error.value) and "nan" in str(error.value)


def test_values_beyond_float32_range_are_kept_in_float64(tmp_path):
    data = DATA.copy()
    data[0, 2] = 1e300
    np.save(tmp_path / "x.npy", data)
    assert load_tabular(tmp_path / "x.npy")[0, 2] == 1e300


def test_non_numeric_csv_column_names_header_line_and_value(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "age,city,score\n31,5,0.5\n40,Paris,0.7\n29,Oslo,0.1\n")
    with pytest.raises(ValueError, match=r"column 'city' \(column 2\) is not numeric: line 3 holds 'Paris'"):
        load_tabular(path)


def test_non_numeric_csv_field_without_header(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "1,2\n3,x\n")
    with pytest.raises(ValueError, match=r"column 2 is not numeric: line 2 holds 'x'"):
        load_tabular(path)


def test_empty_csv_field_is_named(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "a,b\n1,2\n3,\n")
    with pytest.raises(ValueError, match=r"column 'b' \(column 2\) is not numeric: line 3 holds an empty field"):
        load_tabular(path)


def test_ragged_csv_row(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "a,b\n1,2\n3,4,5\n")
    with pytest.raises(ValueError, match=r"line 3 has 3 fields, expected 2"):
        load_tabular(path)


def test_empty_csv(tmp_path):
    with pytest.raises(ValueError, match=r"CSV file is empty"):
        load_tabular(_write_csv(tmp_path / "x.csv", ""))


def test_npz_with_several_arrays_needs_a_key(tmp_path):
    np.savez(tmp_path / "x.npz", train=DATA, test=DATA)
    with pytest.raises(ValueError, match=r"holds 2 arrays \('train', 'test'\); choose one with key="):
        load_tabular(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"no array called 'valid'; the file holds 'train', 'test'"):
        load_tabular(tmp_path / "x.npz", key="valid")


def test_pt_dict_with_several_tensors_needs_a_key(tmp_path):
    torch.save({"a": _expected(), "b": _expected()}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"holds 2 tensors \('a', 'b'\); choose one with key="):
        load_tabular(tmp_path / "x.pt")


def test_key_on_npy_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", DATA)
    with pytest.raises(ValueError, match=r"key='x' applies only to .npz and .pt files"):
        load_tabular(tmp_path / "x.npy", key="x")


def test_non_numeric_dtypes_are_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ValueError, match=r"numeric .* got dtype <U1"):
        load_tabular(tmp_path / "s.npy")
    torch.save(torch.ones(3, 2, dtype=torch.bool), tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"numeric .* got dtype torch.bool"):
        load_tabular(tmp_path / "b.pt")


# The standardizer.


def _sample(n=500, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale, shift = torch.tensor([0.01, 3.0, 250.0]), torch.tensor([5.0, -2.0, 1000.0])
    return torch.randn(n, 3, generator=generator) * scale + shift


def test_standardised_data_has_mean_zero_and_std_one():
    x = _sample()
    z = Standardizer.fit(x).transform(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(3), atol=1e-5, rtol=0)


def test_inverse_undoes_transform():
    x = _sample().double()
    standardizer = Standardizer.fit(x)
    # computed in double precision both ways: a few ulps of each value
    torch.testing.assert_close(standardizer.inverse(standardizer.transform(x)), x, rtol=1e-14, atol=1e-12)
    # a float32 input: standardised values in float32, data units back in float64
    z = standardizer.transform(x.float())
    assert z.dtype == torch.float32 and standardizer.inverse(z).dtype == torch.float64


def test_constant_column_is_refused():
    x = torch.tensor([[1.0, 7.0], [2.0, 7.0], [4.0, 7.0]])
    with pytest.raises(ValueError, match=r"column 1 \(counted from 0\) is constant \(every row is 7.0\)"):
        Standardizer.fit(x)


def test_log_abs_det_is_the_density_change():
    # A Gaussian fitted in data units and the standard one on z must give the same density
    # once log_abs_det is subtracted: N(x; mu, sigma) = N(z; 0, 1) / prod(sigma).
    x = _sample().double()
    standardizer = Standardizer.fit(x)
    data_units = torch.distributions.Normal(standardizer.mean, standardizer.std).log_prob(x).sum(-1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(standardizer.transform(x)).sum(-1)
    torch.testing.assert_close(standard - standardizer.log_abs_det(), data_units, rtol=1e-12, atol=1e-10)


def test_log_abs_det_matches_the_jacobian_of_inverse():
    standardizer = Standardizer.fit(_sample().double())
    jacobian = torch.autograd.functional.jacobian(standardizer.inverse, torch.zeros(3, dtype=torch.float64))
    expected = torch.linalg.slogdet(jacobian).logabsdet.item()
    assert math.isclose(standardizer.log_abs_det().item(), expected, rel_tol=1e-12)


def test_state_dict_round_trips_through_torch_save(tmp_path):
    standardizer = Standardizer.fit(_sample())
    torch.save({"standardizer": standardizer.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["standardizer"]
    restored = Standardizer.from_state_dict(state)
    assert torch.equal(restored.mean, standardizer.mean) and torch.equal(restored.std, standardizer.std)


def test_standardizer_errors():
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(\.\.\., 3\), got shape \(5, 2\)"):
        Standardizer.fit(_sample()).transform(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"keys 'mean' and 'std', got \['mean'\]"):
        Standardizer.from_state_dict({"mean": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"std finite and positive"):
        Standardizer(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        Standardizer.fit(torch.tensor([[0.0], [float("nan")]]))


def test_csv_with_quoted_fields_and_byte_order_mark(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes('\ufeff"a","b"\n"1.5",2\n3,"4"\n'.encode("utf-8"))
    assert torch.equal(load_tabular(path), torch.tensor([[1.5, 2.0], [3.0, 4.0]]))


def test_csv_with_another_separator_says_commas(tmp_path):
    path = _write_csv(tmp_path / "x.csv", "a;b\n1;2\n3;4\n")
    with pytest.raises(ValueError, match=r"line 2 holds '1;2'.*separated by commas"):
        load_tabular(path)


def test_unreadable_files_name_the_path(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects\.npy: could not be read as a NumPy \.npy file"):
        load_tabular(tmp_path / "objects.npy")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: could not be read as a tensor saved with torch.save"):
        load_tabular(tmp_path / "junk.pt")
