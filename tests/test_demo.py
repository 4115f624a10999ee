"""The main job (`make demo` = `python -m flowkern demo`) in its --quick
configuration, without the rectified-flow section (its own test is in
test_rectified.py; the digits section's quality test is test_digits.py): it runs, writes its report and
plots, and every sampler's samples are finite and nearer the data than the
prior they started from. Quality itself is asserted by the slow trained-model
tests (test_pfgm.py, test_convergence.py); --quick trains for seconds."""
import json
import math
import os

from flowkern.demo import main as demo


def test_demo_quick_runs_and_reports(tmp_path):
    out = str(tmp_path / "demo")
    report = demo.main(["--quick", "--no-progress", "--out", out,
                        "--only", "flow matching", "--only", "pfgm", "--only", "digits"])
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    assert set(saved) == {"flow matching", "pfgm", "digits"} == set(report)
    assert os.path.exists(os.path.join(out, "8gaussians_samples.png"))
    assert os.path.exists(os.path.join(out, "8gaussians_quality_vs_nfe.png"))

    methods = {r["method"] for r in saved["pfgm"]["rows"]}
    assert methods == {"pfgm D=1", "pfgm++ D=128"}
    fm_rows = saved["flow matching"]["8gaussians"]["rows"]
    assert {r["method"] for r in fm_rows} == {"euler", "heun", "ei", "dpmpp_2m", "em"}
    # The samplers start from N(0, I) (flow matching) or a prior of radius
    # ~r_max (PFGM): a sliced W2 of a few units. A sampler that goes nowhere or
    # blows up fails this; 4x the data's own noise floor is far above what the
    # quick models reach (~2-3x).
    for rows, floor in ((fm_rows, saved["flow matching"]["8gaussians"]["data_floor"]),
                        (saved["pfgm"]["rows"], saved["pfgm"]["data_floor"])):
        for r in rows:
            assert math.isfinite(r["sw2"]) and r["sw2"] < 4 * floor[0], r

    digits = saved["digits"]
    assert {r["method"] for r in digits["rows"]} == {"euler", "heun", "ei", "dpmpp_2m", "em"}
    for r in digits["rows"]:      # 100 training steps: far from the floor, far below noise
        assert math.isfinite(r["fd"]) and r["fd"] < 0.5 * digits["noise_fd"], r
    assert os.path.exists(os.path.join(out, "digits_dpmpp_2m.png"))
