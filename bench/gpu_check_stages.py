"""The Python stages of ``bench/gpu_check.sh``: the device and its copy bandwidth, the TIES
merge of the 168M-parameter set on the GPU beside the CPU, and the Markdown report.

Run by the script (``python bench/gpu_check_stages.py device|merge|report ...``); each
stage writes JSON into the script's work directory, and ``report`` turns the stage table
(a TSV the script appends to) and those files into one Markdown page. ``report`` needs
neither torch nor fastmerge, so a dry run can write it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent


def device_stage(out: Path) -> int:
    """The GPU, its driver and the device-to-device copy bandwidth (the yardstick of the
    memory-bound ops: scope statistics, TIES), measured with CUDA events."""
    import torch

    props = torch.cuda.get_device_properties(0)
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    best = min(times)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    result = {
        "name": props.name,
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvidia_smi": smi.stdout.strip(),
        # bytes read plus bytes written, as the copy moves both
        "copy_gb_per_s": round(2 * nbytes / best / 1e9, 1),
        "copy_bytes": nbytes,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def _timed(cmd: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, (done.stdout + done.stderr)[-2000:]


def _max_difference(a: Path, b: Path) -> Optional[float]:
    """Largest |a - b| over the tensors of two merged model directories (None if the two
    hold different tensor names)."""
    import torch
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys() or not ta:
        return None
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def merge_stage(workdir: Path, out: Path, small: bool) -> int:
    """TIES (density 0.3, base + 3 experts) of the bench_merge_cli set with
    ``fastmerge merge --device cuda`` beside ``--device cpu``: wall time of each command,
    minus the start-up (``fastmerge merge --help``), and the largest difference."""
    sys.path.insert(0, str(HERE))
    import bench_merge_cli as cli  # the set's definition: one place for both benchmarks

    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = cli.build_in_subprocess(workdir, small)
    built = time.perf_counter() - start
    config = cli.write_config(workdir, paths)
    cli.warm(paths)
    startup, _, _ = _timed(cli.help_command())
    result: dict[str, Any] = {
        "parameters": "3.6M (--small)" if small else "168,313,856 per model",
        "build_s": round(built, 1),
        "startup_s": round(startup, 2),
        "input_bytes": cli.input_bytes(paths),
    }
    outputs = {}
    for device in ("cuda", "cpu"):
        target = workdir / f"merged-{device}"
        cmd = [*cli.merge_command(config, target, fsync=False), "--device", device]
        wall, rc, tail = _timed(cmd)
        result[device] = {
            "wall_s": round(wall, 2),
            "merge_s": round(wall - startup, 2),
            "rc": rc,
            **({"error": tail} if rc else {}),
        }
        outputs[device] = target
    if all(result[d]["rc"] == 0 for d in ("cuda", "cpu")):
        result["max_abs_difference"] = _max_difference(outputs["cuda"], outputs["cpu"])
        result["cpu_over_cuda"] = round(result["cpu"]["merge_s"] / result["cuda"]["merge_s"], 2)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if all(result[d]["rc"] == 0 for d in ("cuda", "cpu")) else 1


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests_summary(xml: Path) -> Optional[str]:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = totals["tests"] - totals["failures"] - totals["errors"] - skipped
    text = (
        f"{totals['tests']} tests: {passed} passed, {totals['failures']} failed, "
        f"{totals['errors']} errors, {skipped} skipped"
    )
    if failed:
        text += "\n\nFailed:\n\n" + "\n".join(f"- `{name}`" for name in failed[:40])
    return text


def _bench_table(payload: dict) -> str:
    rows = payload.get("rows") or []
    if not rows:
        return "(no rows)"
    lines = ["| case | provider | median | unit | ratio to fastmerge |", "|---|---|---|---|---|"]
    for r in rows:
        median = r.get("median")
        ratio = r.get("ratio")
        lines.append(
            f"| {r.get('case')} | {r.get('provider')} | "
            f"{median:.4g} | {r.get('unit') or ''} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |"
            if isinstance(median, (int, float))
            else f"| {r.get('case')} | {r.get('provider')} | {median} | {r.get('unit') or ''} | |"
        )
    return "\n".join(lines)


def report_stage(stages: Path, work: Path, out: Path, header: list[str]) -> int:
    """One Markdown page: the header lines, the stage table (what ran, was skipped or would
    run, and why), then each stage's results found in `work`."""
    table = ["| stage | status | seconds | note |", "|---|---|---|---|"]
    skipped = []
    if stages.exists():
        for line in stages.read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            cell = note.replace("|", "\\|")  # a pipe in a command would end the cell
            table.append(f"| {name} | {status} | {seconds} | {cell} |")
            if status in ("skipped", "failed", "timed out"):
                skipped.append(f"- **{name}** {status}: {note}")
    parts = ["# fastmerge GPU check", "", *header, "", "## Stages", "", *table, ""]
    if skipped:
        parts += ["## Not done, and why", "", *skipped, ""]
    device = _read_json(work / "device.json")
    if device:
        parts += [
            "## Device",
            "",
            f"{device['name']} ({device['multiprocessors']} SMs, {device['memory_gib']} GiB, "
            f"sm_{device['capability'].replace('.', '')}); nvidia-smi: {device['nvidia_smi']}; "
            f"torch {device['torch']} (CUDA {device['torch_cuda']}).",
            "",
            f"Device-to-device copy of {device['copy_bytes'] >> 20} MiB: "
            f"**{device['copy_gb_per_s']} GB/s** (read + written; best of 10): the memory "
            "bandwidth the memory-bound rows below are judged against.",
            "",
        ]
    info = work / "info.txt"
    if info.exists():
        parts += ["## fastmerge info", "", "```", info.read_text().strip(), "```", ""]
    for name, title in (("tests-gpu.xml", "Tests on the GPU"), ("tests-cpu.xml", "Tests (CPU)")):
        summary = _tests_summary(work / name)
        if summary:
            parts += [f"## {title}", "", summary, ""]
    for path in sorted(work.glob("bench-*.json")):
        payload = _read_json(path)
        if payload is not None:
            suite = path.stem.removeprefix("bench-")
            parts += [f"## Benchmark: {suite}", "", _bench_table(payload), ""]
    merge = _read_json(work / "merge.json")
    if merge:
        parts += ["## TIES merge (`fastmerge merge`, density 0.3, base + 3 experts)", ""]
        parts += [f"Models: {merge['parameters']} parameters; inputs {merge['input_bytes']:,} B."]
        parts += ["", "| device | wall s | merge s (wall - start-up) | rc |", "|---|---|---|---|"]
        errors = []
        for device in ("cuda", "cpu"):
            d = merge.get(device, {})
            parts.append(f"| {device} | {d.get('wall_s')} | {d.get('merge_s')} | {d.get('rc')} |")
            if d.get("error"):
                errors += ["", f"`--device {device}` failed:", "", "```", d["error"].strip(), "```"]
        parts += [
            "",
            "Start-up is `fastmerge merge --help`'s wall time; the cuda merge time includes "
            "CUDA's context set-up.",
            *errors,
        ]
        if "cpu_over_cuda" in merge:
            parts += [
                "",
                f"CPU / CUDA merge time: **{merge['cpu_over_cuda']}x**; largest |cuda - cpu|: "
                f"{merge['max_abs_difference']}.",
            ]
        parts.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"wrote {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("device")
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("merge")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--small", action="store_true", help="the 3.6M-parameter set")
    p = sub.add_parser("report")
    p.add_argument("--stages", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--header", action="append", default=[])
    args = parser.parse_args(argv)
    if args.stage == "device":
        return device_stage(args.json)
    if args.stage == "merge":
        return merge_stage(args.workdir, args.json, args.small)
    return report_stage(args.stages, args.work, args.out, args.header)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
