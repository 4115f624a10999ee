"""The digits section of the demo (flowkern/demo/digits.py): its data, its
judge (a classifier's features and the Fréchet distance) and a small
end-to-end run.

The Fréchet distance is checked against closed forms (equal sets: 0; a
mean shift d: |d|^2; diagonal covariances: sum (sqrt a - sqrt b)^2) and
against scipy's sqrtm formula on random features; the judge must rank
corrupted digits worse than real ones, or its number means nothing.
"""
import math

import pytest
import torch

pytest.importorskip("sklearn")
from flowkern.demo import digits as DD  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return DD.load_digits()


@pytest.fixture(scope="module")
def judge(digits):
    x, y = digits
    tr, ho = DD.split(x.shape[0])
    clf = DD.train_classifier(x[tr], y[tr], steps=300)
    return DD.Judge(clf, x[ho]), clf, x[tr], y[tr], x[ho], y[ho]


def test_data(digits):
    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    tr, ho = DD.split(x.shape[0])
    assert len(ho) == DD.HELD_OUT and len(tr) + len(ho) == 1797
    assert not set(tr.tolist()) & set(ho.tolist())
    assert torch.equal(DD.split(x.shape[0])[1], ho)   # fixed


def test_frechet_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    assert abs(DD.frechet_distance(a, a)) < 1e-9
    d = torch.tensor([1.0, -2.0, 0.5, 0, 0, 3.0], dtype=torch.float64)
    assert DD.frechet_distance(a + d, a) == pytest.approx(float(d.square().sum()), rel=1e-9)
    # diagonal covariances: the trace term is sum (sqrt(va) - sqrt(vb))^2
    # (standardise the columns so the sample covariances are what we say)
    z = (a - a.mean(0)) / a.std(0)
    z = torch.linalg.qr(z - z.mean(0)).Q * math.sqrt(a.shape[0] - 1)  # exactly white
    va = torch.tensor([1.0, 4.0, 0.25, 9.0, 1.0, 2.0], dtype=torch.float64)
    vb = torch.tensor([4.0, 1.0, 1.0, 1.0, 0.01, 2.0], dtype=torch.float64)
    expect = float((va.sqrt() - vb.sqrt()).square().sum())
    assert DD.frechet_distance(z * va.sqrt(), z * vb.sqrt()) == pytest.approx(expect, rel=1e-8)


def test_frechet_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.3
    sa, sb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = linalg.sqrtm(sa @ sb).real
    expect = float((a.mean(0) - b.mean(0)).square().sum()) + float(sa.trace() + sb.trace() - 2 * covmean.trace())
    assert DD.frechet_distance(a, b) == pytest.approx(expect, rel=1e-7)


def test_judge_is_meaningful(judge):
    """Held-out accuracy high; real digits far better than noised digits, than
    a single class (mode collapse: ~460, worse than noise's ~400) and than
    noise."""
    jd, clf, x_tr, y_tr, x_ho, y_ho = judge
    assert DD.accuracy(clf, x_ho, y_ho) > 0.96   # 0.980-0.984, seeds 0-2
    g = torch.Generator().manual_seed(3)
    real = jd.fd(x_tr[:DD.HELD_OUT])
    noisy = jd.fd(x_tr[:DD.HELD_OUT] + 0.5 * torch.randn(DD.HELD_OUT, 1, 8, 8, generator=g))
    ones = x_tr[:DD.HELD_OUT][(y_tr[:DD.HELD_OUT] == 1)]     # one class only: mode collapse
    collapsed = jd.fd(ones.repeat(DD.HELD_OUT // ones.shape[0] + 1, 1, 1, 1)[:DD.HELD_OUT])
    noise = jd.fd(torch.randn(DD.HELD_OUT, 1, 8, 8, generator=g))
    assert real < 0.5 * noisy, (real, noisy)
    assert real < 0.2 * collapsed, (real, collapsed)
    assert noisy < 0.5 * noise


def test_end_to_end_small(tmp_path):
    """A short fixed-seed run: every fused sampler's samples beat noise by a
    wide margin and approach the real floor. 200 training steps reach FD 88-196
    at NFE 8 (floor 28-50, noise 1430-1840; seeds 0-2, n = 300): the bound
    0.3 x noise leaves >= 2.2x room."""
    r = DD.run(train_steps=200, nfes=[8], n=300, seed=0, classifier_steps=300, out=str(tmp_path))
    assert r["classifier_accuracy"] > 0.96
    assert r["real_floor"] < 0.1 * r["noise_fd"]
    assert {row["method"] for row in r["rows"]} == set(DD.METHODS)
    for row in r["rows"]:
        assert math.isfinite(row["fd"]) and row["fd"] < 0.3 * r["noise_fd"], row
        assert row["fd"] > r["real_floor"] * 0.5, row     # no sample set beats real data by 2x
    for m in DD.METHODS:
        assert (tmp_path / f"digits_{m}.png").stat().st_size > 1000
    assert (tmp_path / "digits_fd_vs_nfe.png").exists()
