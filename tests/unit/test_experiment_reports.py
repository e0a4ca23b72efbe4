"""The report scripts of the ablation and robustness experiments (benchmarks/): their tables."""

from __future__ import annotations

import pytest


def test_robustness_report_tables_every_model_and_level(tmp_path):
    import csv

    from benchmarks.robustness_eval import parse_levels, parse_models, write_report

    assert parse_levels(["0:0", "0.2:0.5"]) == [(0.0, 0.0), (0.2, 0.5)]
    with pytest.raises(SystemExit, match="DROP:JITTER"):
        parse_levels(["0.2"])
    assert parse_models(["a=runs/x"]) == {"a": "runs/x"}
    with pytest.raises(SystemExit, match="NAME=MODEL_REF"):
        parse_models(["runs/x"])
    rows = [
        {
            "model": m,
            "drop": d,
            "jitter": j,
            "segm_ap": ap,
            "segm_ap50": ap,
            "occluded_segm_ap": ap / 2,
        }
        | {"predicted": 3}
        for m, base in (("ours", 0.5), ("ours+occ", 0.4))
        for d, j, ap in ((0.0, 0.0, base), (0.2, 0.0, base - 0.1), (0.0, 0.5, base - 0.2))
    ]
    write_report(rows, str(tmp_path), title="t")
    table = (tmp_path / "robustness.md").read_text()
    assert "| 0.2 | 0 | 0.400 / 0.200 | 0.300 / 0.150 |" in table
    assert "ours+occ AP / occluded AP" in table
    with open(tmp_path / "robustness.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_ablation_over_seeds_flags_only_differences_beyond_the_spread(tmp_path):
    from benchmarks.ablation_seeds import combine, read_runs, write_report

    def run(path, aps):
        path.write_text(
            "trial,variant,status,epochs,val_segm_ap,val_occluded_segm_ap\n"
            + "".join(f"t{i},{name},OK,4,{ap},{ap / 2}\n" for i, (name, ap) in enumerate(aps))
            + "t9,broken,ERROR,1,nan,nan\n"
        )
        return str(path)

    a = run(tmp_path / "a.csv", [("ours", 0.30), ("small", 0.31), ("big", 0.40)])
    b = run(tmp_path / "b.csv", [("ours", 0.32), ("small", 0.30), ("big", 0.41)])
    result = combine(read_runs([a, b]), reference="ours")
    rows = {r["trial"]: r for r in result["rows"]}
    assert result["spread"] == pytest.approx(0.02)
    assert "broken" not in rows
    assert rows["big"]["delta"] == pytest.approx(0.095)
    assert rows["big"]["beyond_spread"] and not rows["small"]["beyond_spread"]
    write_report(result, str(tmp_path / "report"))
    md = (tmp_path / "report" / "ablation_seeds.md").read_text()
    assert "| big | 0.400 | 0.410 | 0.405 | 0.203 | +0.095 | yes |" in md
    with pytest.raises(SystemExit, match="--reference"):
        combine(read_runs([a]), reference="paper")
