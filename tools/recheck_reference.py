"""Re-run the integer reference against the interpreter on every integer file of a models folder (front ends on
test pixels, backends on the front end's features).  Writes a JSON report (command in benchmarks/README.md)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tfbitmeta.data import datasets
from tfbitmeta.export import emulate
from tfbitmeta.runs import RunDir, TrainConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = RunDir(Path(args.run))
    norm = run.normalization()
    data = datasets.load(TrainConfig.from_dict(run.read_meta()["train"]).dataset)
    px = norm.pixels(data.x_test).numpy()
    manifest = json.loads((Path(args.models) / "manifest.json").read_text())
    rows = {}
    for f in manifest["files"]:
        if f["kind"] != "front_end":
            continue
        front = (Path(args.models) / f["path"]).read_bytes()
        back = (Path(args.models) / f"backend_{f['bits']['name']}_split{f['split']}.tflite").read_bytes()
        fr = emulate.compare(front, {"image": px})
        br = emulate.compare(back, {"features": fr["interpreter"]["features"]})
        for name, r in ((f["path"], fr), (f"backend_{f['bits']['name']}_split{f['split']}.tflite", br)):
            rows[name] = {"integer": r["integer"], "bit_exact": r["bit_exact"], "images": r["images"],
                          "outputs": r["outputs"]}
    out = {"command": f"uv run python tools/recheck_reference.py --run {args.run} --models {args.models} --out {args.out}",
           "files": rows, "integer_files": sum(r["integer"] for r in rows.values()),
           "bit_exact": sum(r["bit_exact"] for r in rows.values()), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(out["integer_files"], out["bit_exact"])


if __name__ == "__main__":
    main()
