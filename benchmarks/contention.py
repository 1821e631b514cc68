"""
Wall time of the tiny recipes and of a short `benchmarks/step_time.py` run alone and beside one CPU-bound process,
with the package's default CPU threads (`OMP_NUM_THREADS` unset).

    python benchmarks/contention.py                 # 3 interleaved repeats, about 10 minutes on 2 cores
    python benchmarks/contention.py --repeats 5

Each repeat runs every command alone, then with a busy-loop process started beside it, so that slow drifts of the
machine's load fall on both arms alike. The table gives the median seconds per arm and their ratio; the load average
at the start is printed with it, as other jobs on a shared machine count as load too.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
BUSY_LOOP = "while True: pass"


def commands(workdir: Path, run: str) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "tiny reward recipe": [
            python, "-m", "hf_reinforce.scripts.reward", "--config", "recipes/tiny/reward/config_qlora.yaml",
            "--output_dir", str(workdir / f"reward-{run}"),
        ],
        "tiny REINFORCE recipe": [
            python, "-m", "hf_reinforce.scripts.reinforce", "--config", "recipes/tiny/reinforce/config_qlora.yaml",
            "--output_dir", str(workdir / f"reinforce-{run}"),
        ],
        "step_time.py (4 steps, QLoRA critic)": [
            python, str(ROOT / "benchmarks" / "step_time.py"), "--steps", "4", "--repeats", "1",
            "--configurations", "ReinforceTrainer critic, QLoRA shared base",
        ],
    }  # fmt: skip


def timed(command: list[str], workdir: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def prepare(workdir: Path, env: dict) -> None:
    (workdir / "recipes").symlink_to(ROOT / "recipes")
    subprocess.run([sys.executable, "-m", "hf_reinforce.cli", "make-tiny", "--output_dir", "outputs/tiny"],
                   cwd=workdir, env=env, check=True, capture_output=True)  # fmt: skip
    reward = [sys.executable, "-m", "hf_reinforce.scripts.reward", "--config", "recipes/tiny/reward/config_qlora.yaml"]
    subprocess.run(reward, cwd=workdir, env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_dir", default="outputs/benchmarks/contention")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # the package's default
    env["HF_HUB_OFFLINE"] = "1"
    load_at_start = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        prepare(workdir, env)
        for repeat in range(args.repeats):
            for arm in ("alone", "beside a busy process"):
                competitor = None if arm == "alone" else subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                try:
                    for name, command in commands(workdir, f"{repeat}-{arm[0]}").items():
                        seconds = timed(command, workdir, env)
                        times.setdefault(name, {}).setdefault(arm, []).append(seconds)
                        print(f"[{repeat + 1}/{args.repeats}] {name}, {arm}: {seconds:.1f} s", flush=True)
                finally:
                    if competitor is not None:
                        competitor.kill()
    rows = []
    for name, arms in times.items():
        alone, beside = statistics.median(arms["alone"]), statistics.median(arms["beside a busy process"])
        rows.append({"command": name, "alone_s": alone, "beside_s": beside, "ratio": beside / alone})
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"cores": os.cpu_count(), "load_average_at_start": load_at_start, "repeats": args.repeats, "rows": rows,
               "times": times}  # fmt: skip
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{os.cpu_count()} cores, load average at start {load_at_start[0]:.2f}; medians of {args.repeats} runs\n")
    print("| command | alone | beside a busy process | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['command']} | {row['alone_s']:.1f} s | {row['beside_s']:.1f} s | {row['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
