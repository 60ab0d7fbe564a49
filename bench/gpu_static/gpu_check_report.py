"""The one JSON of ``bench/gpu_check.sh``: device, versions, commit, each step's outcome and time, and
per bench row img/s, the ratio to the plain gradient and peak memory (both dtypes in one file).

    python -m bench.gpu_static.gpu_check_report WORKDIR OUT.json
WORKDIR holds what the script wrote: steps.tsv (name, exit code, seconds), device.json, static.json
(optional) and the bench result files (bench-*.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(bench_file: Path) -> list:
    payload = json.loads(bench_file.read_text())
    rows = []
    for r in payload["rows"]:
        ms = r.get("median_ms")
        rows.append({
            "model": r["model"], "composite": r["composite"], "provider": r["provider"], "dtype": r["dtype"],
            "batch": r["batch"], "size": r["size"], "status": r["status"], "median_ms": ms,
            "img_per_s": None if not ms else round(r["batch"] * 1e3 / ms, 3),
            "x_gradient": r.get("ratio_to_grad"), "x_zennit": r.get("ratio_to_zennit"),
            "peak_mem_mb": r.get("peak_mem_mb"), "rel_err_vs_zennit": r.get("rel_err_vs_zennit"),
            "note": r.get("note", ""),
        })
    return rows, payload["environment"]


def build(workdir: Path) -> dict:
    steps = []
    steps_file = workdir / "steps.tsv"
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            name, code, seconds = line.split("\t")
            steps.append({"step": name, "exit_code": int(code), "seconds": int(seconds)})
    report = {"steps": steps, "ok": all(s["exit_code"] == 0 for s in steps)}
    device = workdir / "device.json"
    report["device"] = json.loads(device.read_text()) if device.exists() else None
    static = workdir / "static.json"
    if static.exists():
        summary = json.loads(static.read_text())["summary"]
        report["static_checks"] = {k: summary[k] for k in ("compiles", "ok", "failures", "seconds")}
    report["bench"], report["environment"] = [], None
    for f in sorted(workdir.glob("bench-*.json")):
        rows, env = _rows(f)
        report["bench"] += rows
        report["environment"] = report["environment"] or env
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = build(Path(argv[0]))
    Path(argv[1]).write_text(json.dumps(report, indent=1, default=str) + "\n")
    ok_rows = [r for r in report["bench"] if r["img_per_s"] is not None]
    print(f"{'model':10} {'dtype':9} {'composite':18} {'provider':18} {'img/s':>9} {'x grad':>7} {'peak MB':>9}")
    for r in ok_rows:
        print(f"{r['model']:10} {r['dtype']:9} {r['composite']:18} {r['provider']:18} {r['img_per_s']:9.1f} "
              f"{(r['x_gradient'] or 0):7.2f} {(r['peak_mem_mb'] or 0):9.1f}")
    for s in report["steps"]:
        print(f"step {s['step']}: exit {s['exit_code']} in {s['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
