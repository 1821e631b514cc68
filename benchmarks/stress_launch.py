"""Launch the tiny two-process REINFORCE run many times beside a competing CPU-bound process, and count the launches
that hang (at exit or anywhere else) or fail.

A multi-process run that finished its work must also exit: a process-group object freed at interpreter exit after the
group is gone waits forever on threads whose peers have left, and it shows up under load, once in several launches.
Each launch here is `hf-reinforce reinforce --accelerate_config ddp --num_processes 2` on CPU (gloo), with the tiny
recipe, given `--timeout` seconds; a launch still running then is a hang, and is killed with its process group.

    python benchmarks/stress_launch.py --launches 30            # the full stress run (~15-25 min on 2 cores)
    python benchmarks/stress_launch.py --launches 5 --workdir /tmp/stress

Writes `stress_launch.json` (every launch: status, seconds, ranks that reported) to --workdir and prints a summary.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parent.parent
RECIPE = REPOSITORY / "recipes" / "tiny" / "reinforce" / "config_qlora.yaml"
REWARD_RECIPE = REPOSITORY / "recipes" / "tiny" / "reward" / "config_qlora.yaml"
RESULTS_FILE = "stress_launch.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def single_threaded_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def prepare(workdir: Path) -> None:
    """The tiny models, data and reward adapter the tiny REINFORCE recipe reads, under `workdir/outputs/tiny`."""
    if (workdir / "outputs" / "tiny" / "reward" / "adapter_model.safetensors").is_file():
        return
    subprocess.run(
        [sys.executable, "-m", "hf_reinforce.cli", "make-tiny", "--output_dir", "outputs/tiny"],
        cwd=workdir, env=single_threaded_env(), check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "hf_reinforce.cli", "reward", "--config", str(REWARD_RECIPE)],
        cwd=workdir, env=single_threaded_env(), check=True, capture_output=True,
    )  # fmt: skip


def launch_command(output_dir: Path, max_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "hf_reinforce.cli", "reinforce",
        "--accelerate_config", "ddp", "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(free_port()),
        "--config", str(RECIPE), "--critic_shares_base", "false",
        "--max_steps", str(max_steps), "--save_steps", str(max_steps), "--logging_steps", str(max_steps),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
    ]  # fmt: skip


def ranks_finished(output: str) -> int:
    return sum(f"[process {rank}/2] finished" in output for rank in (1, 2))


def run_launch(workdir: Path, index: int, max_steps: int, timeout: float) -> dict:
    """One two-process launch: "ok", "failed" (non-zero exit), "exit_hang" (both ranks finished, no exit) or
    "hang" (stopped before finishing)."""
    output_dir = workdir / "outputs" / "stress" / f"launch-{index}"
    start = time.monotonic()
    process = subprocess.Popen(
        launch_command(output_dir, max_steps), cwd=workdir, env=single_threaded_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks: the session started above
        output, _ = process.communicate()
        status = "exit_hang" if ranks_finished(output) == 2 else "hang"
    result = {
        "launch": index,
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "ranks_finished": ranks_finished(output),
        "returncode": process.returncode,
    }
    if status != "ok":
        result["output_tail"] = output[-3000:]
    return result


def start_competitor() -> subprocess.Popen:
    """A CPU-bound process competing for the cores, as another job on a shared machine does."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)


def stress(workdir: Path, launches: int, max_steps: int, timeout: float, compete: bool) -> dict:
    prepare(workdir)
    competitor = start_competitor() if compete else None
    results = []
    start = time.monotonic()
    try:
        for index in range(launches):
            result = run_launch(workdir, index, max_steps, timeout)
            results.append(result)
            print(f"launch {index + 1}/{launches}: {result['status']} in {result['seconds']} s", flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    counts = {status: sum(r["status"] == status for r in results) for status in ("ok", "failed", "exit_hang", "hang")}
    seconds = [r["seconds"] for r in results if r["status"] == "ok"]
    summary = {
        "launches": launches,
        "competing_process": compete,
        "max_steps": max_steps,
        "timeout_seconds": timeout,
        **counts,
        "total_seconds": round(time.monotonic() - start, 1),
        "ok_seconds_min_max": [min(seconds), max(seconds)] if seconds else None,
        "results": results,
    }
    (workdir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=30, help="Two-process launches to run, one after another.")
    parser.add_argument("--max_steps", type=int, default=4, help="Optimizer steps of each launch.")
    parser.add_argument("--timeout", type=float, default=240, help="Seconds before a launch counts as hung.")
    parser.add_argument("--workdir", default=None, help="Folder for the tiny models and runs (default: a temp dir).")
    parser.add_argument("--no_competitor", action="store_true", help="Run without the competing CPU-bound process.")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="stress-launch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = stress(workdir, args.launches, args.max_steps, args.timeout, compete=not args.no_competitor)
    print(
        f"{summary['launches']} launches in {summary['total_seconds']} s: {summary['ok']} ok, {summary['failed']} "
        f"failed, {summary['exit_hang']} hung at exit, {summary['hang']} hung before finishing "
        f"(results: {workdir / RESULTS_FILE})"
    )
    return 0 if summary["ok"] == summary["launches"] else 1


if __name__ == "__main__":
    sys.exit(main())
