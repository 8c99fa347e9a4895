"""The whole PeBR-R1 pipeline on the embedded default, on a CPU, in one command.

    python scripts/demo.py [--out demo_runs] [--profile full|quick] [--seed 0 | --seeds 0 1 2] [--force]

make the small model -> make synthetic data -> filter the SFT data -> warm-up SFT -> train the tiny CLIP
-> sampling (8 rollouts per question) -> easy/medium/hard split -> stage 1 RL on easy cases (easy + medium when
the easy ones do not fill one rollout batch) -> merge
-> stage 2 RL on medium cases -> merge -> evaluate the warm-up, stage-1 and stage-2 models on the held-out
split -> a table (results.md) and a plot of reward and accuracy over the RL steps (training_curves.png).

Each stage runs the project's own command line (the bash recipes' CPU twins for sampling and RL), shows
its progress, and is skipped when it finished before with the same command and environment after the same
run of the stage before it; otherwise it runs again on a fresh output (`--force` reruns everything). An
interrupted stage resumes on its next call with the same settings: the warm-up from its checkpoint of every 100
steps, the RL stages from theirs of every 5 steps, sampling and evaluation from their saved answers (the CPU
recipes alone save RL runs at their last step only). `--profile quick` is a
shortened run on the tiny model (a few steps per stage) that the tests use. `--seeds 0 1 2` runs the whole
pipeline once per seed (in OUT/seed_K) and writes OUT/seeds.md: each model's mean and spread over the seeds,
and the per-seed change of stage 2 over the warm-up model.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# How often the warm-up (optimizer steps) and the RL stages (RL steps) save a checkpoint to resume from.
SFT_SAVE_EVERY, RL_SAVE_EVERY = 100, 5
sys.path.insert(0, ROOT)
from pebr.config import seed_argument  # noqa: E402
from pebr.utils.jsonio import atomic_write_json, atomic_write_text  # noqa: E402


@dataclass
class Profile:
    model_size: str
    num_questions: int
    sft_num: int
    image_size: int
    sft_epochs: float
    sft_lr: float
    sft_batch_size: int
    max_response_length: int
    rollout_batch_size: int
    global_batch_size: int
    rl_n: int
    rl_lr: float
    stage1_steps: int
    stage2_steps: int
    clip_steps: int
    eval_limit: int | None
    test_fraction: float = 0.2  # share of num_questions held out for the evaluation
    # Scene difficulty (scripts/make_synthetic_data.py) and the warm-up's vision settings (scripts/sft_warmup.py).
    colors: str = "red,blue,green,yellow,purple,gray"
    max_objects: int = 6
    object_scale: float = 1.0
    sft_freeze_vision: bool = True
    # The warm-up teacher's flaws (scripts/make_synthetic_data.py): shares of SFT traces whose last line gives the
    # total number of objects, and whose objects are named without sizes.
    sft_total_answer_share: float = 0.0
    sft_no_size_share: float = 0.0
    sft_bf16: bool = False
    bf16: bool = False  # bf16 compute for RL (this CPU's AMX makes bf16 matmuls ~4x faster than fp32)
    # scripts/evaluate.py's engine: vLLM for hundreds of questions; for a handful, transformers' generate is done
    # before a vLLM engine has started.
    eval_backend: str = "vllm"


PROFILES = {
    # The warm-up recipe of the SFT study: easier scenes (4 colours, 2-4 objects at 1.5x size) and the random
    # vision tower kept frozen (trained, it collapses to one constant vector), 3 epochs at lr 2e-3 in bf16.
    # The SFT traces come from an imperfect teacher (60% answer with the total count, right anyway for about a fifth
    # of those, so about half end wrong; 60% omit sizes): with a faithful one the warm-up scored 52% and RL could not
    # improve it; with this one stage 2 gains 8-18 points over 3 seeds (README). RL: 16 prompts x 8 per step in one on-policy update (no old log-prob pass) at lr 3e-5.
    # 300 held-out questions: with 60, one question is 1.7 points and the seed-to-seed spread drowns any effect.
    "full": Profile(model_size="small", num_questions=540, test_fraction=300 / 540, sft_num=1500, image_size=112,
                    sft_epochs=3.0, sft_lr=2e-3, sft_batch_size=8, max_response_length=256, rollout_batch_size=16,
                    global_batch_size=16, rl_n=8, rl_lr=3e-5, stage1_steps=8, stage2_steps=15, clip_steps=400,
                    eval_limit=None, bf16=True,
                    colors="red,blue,green,yellow", max_objects=4, object_scale=1.5, sft_freeze_vision=True,
                    sft_bf16=True, sft_total_answer_share=0.6, sft_no_size_share=0.6),
    "quick": Profile(model_size="tiny", num_questions=40, sft_num=40, image_size=56, sft_epochs=1.0, sft_lr=1e-3,
                     sft_batch_size=8, max_response_length=24, rollout_batch_size=2, global_batch_size=2, rl_n=4,
                     rl_lr=1e-5, stage1_steps=1, stage2_steps=1, clip_steps=5, eval_limit=8,
                     sft_total_answer_share=0.5, sft_no_size_share=0.5, eval_backend="hf"),
}


def _digest(marker: dict) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, out: str, profile: Profile, seed: int):
        self.out, self.p, self.seed = os.path.abspath(out), profile, seed
        os.makedirs(self.out, exist_ok=True)
        self.times: dict[str, float] = {}
        self.upstream = ""  # the digest of the last stage's done marker: part of the next stage's recipe

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage(self, name: str, output: str, cmd: list[str], env: dict | None = None) -> None:
        """Run `cmd` unless it finished before with the same recipe: command, environment and the marker of the
        stage before it (so a stage whose input was made again, even by an interrupted call, runs again).

        Markers sit beside the output: `OUTPUT.started` (the recipe, written before the command runs) and
        `OUTPUT.done` (written on success). An output left by another recipe is deleted first, with the
        warm-up's `OUTPUT.checkpoints` (a stale RL run directory, rollout file or warm-up checkpoint would be
        resumed, or refused); one left by an interrupted run of this recipe is kept, for the trainer, the sampler
        and the warm-up to resume."""
        recipe = {"command": cmd, "env": env or {}, "upstream": self.upstream}
        done, started = self._marker(output, "done"), self._marker(output, "started")
        if done is not None and done.get("recipe") == recipe and os.path.exists(output):
            self.times[name] = float(done.get("seconds", "nan"))  # what the stage took when it ran
            self.upstream = _digest(done)
            print(f"[demo] {name}: done before, skipped ({output})", flush=True)
            return
        # The warm-up's resumable checkpoints sit beside its output, which it writes only once complete.
        leftovers = [path for path in (output, f"{output}.checkpoints") if os.path.exists(path)]
        if leftovers and (done is not None or started is None or started.get("recipe") != recipe):
            print(f"[demo] {name}: {leftovers[0]} was made from other inputs; making it again", flush=True)
            for path in leftovers:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for kind in ("done", "started"):
            if os.path.exists(f"{output}.{kind}"):
                os.remove(f"{output}.{kind}")
        atomic_write_json(f"{output}.started", {"recipe": recipe})
        print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        # The bash recipes call `python3`: make it this interpreter (the project's virtual environment).
        path = os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", "")
        code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PATH": path, **(env or {})}).returncode
        if code != 0:
            raise StageFailed(f"[demo] {name} failed (exit status {code}; its own message is above); the stages "
                              "before it are kept: run the same command again to go on from it", code)
        self.times[name] = time.time() - t0
        done = {"seconds": round(self.times[name], 1), "finished": time.time(), "recipe": recipe}
        atomic_write_json(f"{output}.done", done)
        os.remove(f"{output}.started")
        self.upstream = _digest(done)
        print(f"[demo] {name}: {self.times[name]:.0f} s", flush=True)

    @staticmethod
    def _marker(output: str, kind: str) -> dict | None:
        """The `OUTPUT.kind` marker; None when there is none ({} for an unreadable one)."""
        try:
            with open(f"{output}.{kind}") as f:
                marker = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return marker if isinstance(marker, dict) else {}

    def rl_overrides(self, steps: int) -> list[str]:
        p = self.p
        return [f"data.max_response_length={p.max_response_length}", f"data.rollout_batch_size={p.rollout_batch_size}",
                f"worker.actor.global_batch_size={p.global_batch_size}", f"worker.rollout.n={p.rl_n}",
                f"worker.actor.optim.lr={p.rl_lr}", f"trainer.max_steps={steps}", "trainer.save_limit=1",
                f"trainer.save_freq={RL_SAVE_EVERY}",  # an interrupted stage resumes (the CPU recipe: last step)
                f"data.seed={self.seed}", f"worker.rollout.seed={self.seed}",
                # The warm-up's vision tower is random and frozen; RL keeps it so.
                f"worker.actor.model.freeze_vision_tower={str(p.sft_freeze_vision).lower()}"] + (
                    ["worker.actor.fsdp.mixed_precision=bf16", "worker.rollout.dtype=bf16"] if p.bf16 else [])

    def run(self) -> None:
        p, data = self.p, self.path("data")
        images = os.path.join(data, "images")
        self.stage("small model", self.path("model"),
                   [PY, "scripts/make_tiny_model.py", "--output", self.path("model"), "--size", p.model_size,
                    "--seed", str(self.seed)])
        self.stage("synthetic data", data,
                   [PY, "scripts/make_synthetic_data.py", "--output_dir", data, "--num", str(p.num_questions),
                    "--seed", str(self.seed), "--sft_num", str(p.sft_num), "--image_size", str(p.image_size),
                    "--test_fraction", str(p.test_fraction),
                    "--colors", p.colors, "--max_objects", str(p.max_objects), "--object_scale", str(p.object_scale),
                    "--sft_total_answer_share", str(p.sft_total_answer_share),
                    "--sft_no_size_share", str(p.sft_no_size_share)])
        clean = os.path.join(data, "sft", "clean.json")
        self.stage("filter SFT data", clean,
                   [PY, "dataset/filter.py", "--input", os.path.join(data, "sft", "sft.json"), "--output", clean,
                    "--image_root", images])
        self.stage("warm-up SFT", self.path("warmup"),
                   [PY, "scripts/sft_warmup.py", "--model_path", self.path("model"), "--data", clean,
                    "--image_dir", images, "--output_dir", self.path("warmup"), "--epochs", str(p.sft_epochs),
                    "--lr", str(p.sft_lr), "--batch_size", str(p.sft_batch_size), "--seed", str(self.seed),
                    "--freeze_vision_tower" if p.sft_freeze_vision else "--no-freeze_vision_tower",
                    "--bf16" if p.sft_bf16 else "--no-bf16", "--save_steps", str(SFT_SAVE_EVERY)],
                   # The built-in warm-up trains on one device and refuses several visible GPUs: the first one.
                   env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]})
        self.stage("tiny CLIP", self.path("clip"),
                   [PY, "scripts/train_tiny_clip.py", "--output", self.path("clip"), "--steps", str(p.clip_steps),
                    "--seed", str(self.seed)])
        split = self.path("split")
        self.stage("sampling + split", split,
                   ["bash", "examples/pebr_sample_cpu.sh", f"data.max_response_length={p.max_response_length}",
                    f"data.rollout_batch_size={max(p.rollout_batch_size, 16)}"],
                   env={"MODEL_PATH": self.path("warmup"), "TRAIN_FILES": os.path.join(data, "train.json"),
                        # In the stage's own output: made again with it when its inputs change.
                        "IMAGE_DIR": images, "ROLLOUTS": os.path.join(split, "rollouts.jsonl"), "SPLIT_DIR": split})
        stage1_data, medium = self.split_file(*self.stage1_kinds()), self.split_file("medium")
        self.stage("stage 1 (perception RL on easy cases) + merge", self.path("stage1"),
                   ["bash", "examples/pebr_stage1_cpu.sh", *self.rl_overrides(p.stage1_steps),
                    *self.batch_fit(stage1_data)],
                   env={"MODEL_PATH": self.path("warmup"), "TRAIN_FILES": stage1_data, "IMAGE_DIR": images,
                        "CLIP_MODEL_PATH": self.path("clip"), "RUN_DIR": self.path("stage1")})
        self.stage("stage 2 (reasoning RL on medium cases) + merge", self.path("stage2"),
                   ["bash", "examples/pebr_stage2_cpu.sh", *self.rl_overrides(p.stage2_steps),
                    *self.batch_fit(medium)],
                   env={"STAGE1_DIR": self.path("stage1"), "TRAIN_FILES": medium, "IMAGE_DIR": images,
                        "RUN_DIR": self.path("stage2")})
        models = {"warm-up SFT": self.path("warmup"), "stage 1": self.merged("stage1"), "stage 2": self.merged("stage2")}
        for label, model in models.items():
            name = label.split()[0] + label.split()[-1] if label.startswith("stage") else "warmup"
            cmd = [PY, "scripts/evaluate.py", "--model_path", model, "--data", os.path.join(data, "test.json"),
                   "--image_dir", images, "--output", self.path("eval", name),
                   "--max_new_tokens", str(p.max_response_length), "--backend", p.eval_backend]
            if p.eval_limit:
                cmd += ["--limit", str(p.eval_limit)]
            self.stage(f"evaluate {label}", self.path("eval", name + ".json"), cmd)
        self.report(models)

    def split_records(self, kind: str) -> list[dict]:
        with open(self.path("split", f"{kind}case.json")) as f:
            return json.load(f)

    def stage1_kinds(self) -> tuple[str, ...]:
        """The easy cases, as in the paper; when they do not fill one rollout batch, easy + medium, said loudly.

        A small warm-up model leaves few easy (8/8) questions. The stage-1 reward does not grade the answer,
        so questions answered right at least once are still a fair place to reward the description; the
        hard ones (0/8) stay out.
        """
        easy = len(self.split_records("easy"))
        if easy >= self.p.rollout_batch_size:
            return ("easy",)
        print(f"[demo] WARNING: {easy} easy cases fill less than one batch of {self.p.rollout_batch_size}; "
              "stage 1 trains on the easy + medium cases", flush=True)
        return ("easy", "medium")

    def split_file(self, *kinds: str) -> str:
        """The split's records of these kinds; with none (a weak warm-up model) every RL question, said loudly."""
        records = [r for kind in kinds for r in self.split_records(kind)]
        if not records:
            print(f"[demo] WARNING: the warm-up model left no {' or '.join(kinds)} cases; this stage trains on all "
                  "RL questions", flush=True)
            return self.path("data", "train.json")
        if len(kinds) == 1:
            return self.path("split", f"{kinds[0]}case.json")
        path = self.path("split", "_".join(kinds) + ".json")
        atomic_write_json(path, records)
        return path

    def batch_fit(self, split_file: str) -> list[str]:
        """Shrink the prompt batch when a split is smaller than it."""
        with open(split_file) as f:
            size = len(json.load(f))
        b = min(self.p.rollout_batch_size, size)
        g = min(self.p.global_batch_size, b)
        while b % g:
            g -= 1
        return [f"data.rollout_batch_size={b}", f"worker.actor.global_batch_size={g}"]

    def merged(self, stage: str) -> str:
        from pebr.checkpoint import latest_checkpoint

        latest = latest_checkpoint(self.path(stage))
        if latest is None:
            raise SystemExit(f"[demo] no checkpoint in {self.path(stage)}")
        return os.path.join(latest, "actor", "huggingface")

    def report(self, models: dict[str, str]) -> None:
        rows = []
        for label in models:
            name = label.split()[0] + label.split()[-1] if label.startswith("stage") else "warmup"
            with open(self.path("eval", name + ".json")) as f:
                r = json.load(f)
            s = r.get("overall", r)
            rows.append((label, s))
        split_counts = {}
        for kind in ("easy", "medium", "hard"):
            split_counts[kind] = len(self.split_records(kind))
        lines = ["| model | accuracy | format rate | keyword recall | mean response length |",
                 "| --- | --- | --- | --- | --- |"]
        for label, s in rows:
            fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            length = "n/a" if s["mean_response_length"] is None else f"{s['mean_response_length']:.0f}"
            lines.append(f"| {label} | {fmt(s['accuracy'])} | {fmt(s['format_rate'])} | {fmt(s['keyword_recall'])} "
                         f"| {length} |")
        lines += ["", f"held-out questions: {rows[0][1]['count']}; split of the RL questions: "
                  + ", ".join(f"{k} {v}" for k, v in split_counts.items())]
        table = "\n".join(lines)
        atomic_write_text(self.path("results.md"), table + "\n")
        print("\n" + table + "\n", flush=True)
        self.plot()
        print(f"[demo] wrote {self.path('results.md')} and {self.path('training_curves.png')}", flush=True)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ("reward/overall", "reward/keyword", "reward/accuracy")
        titles = ("reward (overall, per stage's own reward)", "keyword recall of rollouts (stage 1's reward)",
                  "accuracy of rollouts")
        fig, axes = plt.subplots(1, len(keys), figsize=(16, 4))
        offset = 0
        for stage, color in (("stage1", "tab:blue"), ("stage2", "tab:orange")):
            path = self.path(stage, "metrics.jsonl")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
            steps = [offset + m["step"] for m in metrics]
            for ax, key in zip(axes, keys):
                if any(key in m for m in metrics):
                    values = [m.get(key) for m in metrics]  # null in the file: a non-finite value
                    ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", color=color,
                            label=stage)
            offset = steps[-1] if steps else offset
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("RL step (stage 2 continues after stage 1)")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.path("training_curves.png"), dpi=100)


MODELS = (("warm-up SFT", "warmup"), ("stage 1", "stage1"), ("stage 2", "stage2"))


def seed_summary(out: str, seeds: list[int], stage_s: dict[int, float]) -> str:
    """OUT/seeds.md: per model the mean and (min-max) over seeds; per seed the time its stages took (also those
    done by an earlier run) and what each RL stage changed."""
    results = {}
    for seed in seeds:
        for _, name in MODELS:
            with open(os.path.join(out, f"seed_{seed}", "eval", name + ".json")) as f:
                r = json.load(f)
            results[seed, name] = r.get("overall", r)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731

    def cell(name: str, key: str) -> str:
        vals = [results[s, name][key] for s in seeds]
        if None in vals:  # no held-out question had key words, or every prompt was skipped
            return "n/a"
        return f"{pct(sum(vals) / len(vals))} ({pct(min(vals))}-{pct(max(vals))})"

    lines = [f"Seeds {', '.join(map(str, seeds))}; held-out questions per seed: {results[seeds[0], 'warmup']['count']}.",
             "", "| model | accuracy % mean (min-max) | keyword recall % mean (min-max) | format rate % mean (min-max) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {cell(name, 'accuracy')} | {cell(name, 'keyword_recall')} | {cell(name, 'format_rate')} |"
              for label, name in MODELS]
    lines += ["", "| seed | time of its stages | stage 2 - warm-up accuracy (points) | stage 1 - warm-up keyword recall (points) |",
              "| --- | --- | --- | --- |"]
    gains = []
    for seed in seeds:
        gain = results[seed, "stage2"]["accuracy"] - results[seed, "warmup"]["accuracy"]
        recalls = (results[seed, "stage1"]["keyword_recall"], results[seed, "warmup"]["keyword_recall"])
        recall = "n/a" if None in recalls else f"{100 * (recalls[0] - recalls[1]):+.1f}"
        gains.append(gain)
        lines.append(f"| {seed} | {stage_s.get(seed, float('nan')) / 60:.1f} min | {100 * gain:+.1f} | {recall} |")
    warm = [results[s, "warmup"]["accuracy"] for s in seeds]
    lines += ["", f"Mean change of accuracy, stage 2 vs warm-up: {100 * sum(gains) / len(gains):+.1f} points; "
              f"spread of the warm-up accuracy over seeds (max-min): {100 * (max(warm) - min(warm)):.1f} points; "
              f"spread of the per-seed change: {100 * (max(gains) - min(gains)):.1f} points."]
    table = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out, "seeds.md"), table)
    return table


def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512 BF16: without either, torch emulates bf16 matmuls, and the full profile's bf16 warm-up
    step took 24 s against 2 s in fp32 on an AVX2-only AMD EPYC (2026-11-29)."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported",
                                                                        "_is_avx512_bf16_supported"))


def resolve_bf16(profile: Profile, choice: str, native: bool) -> Profile:
    """The profile with its bf16 flags kept ("yes"), cleared ("no"), or kept only where bf16 is native ("auto")."""
    if choice == "no" or (choice == "auto" and not native):
        return replace(profile, bf16=False, sft_bf16=False)
    return profile


# Written into an --out directory this script creates (or finds empty); it deletes or replaces nothing in any other.
OWNER_MARK = ".pebr_demo_output"


class StageFailed(RuntimeError):
    """A stage's command failed; `code` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "demo_runs"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    # (the seed of the first of the CPU recipes' two rollout engines: the second takes it plus one)
    seed = functools.partial(seed_argument, engines=2)
    parser.add_argument("--seed", type=seed, default=None, help="the run's seed (default 0)")
    parser.add_argument("--seeds", type=seed, nargs="+", default=None,
                        help="run the pipeline once per seed (OUT/seed_K) and summarise the spread in OUT/seeds.md")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="the profile's bf16 compute: auto keeps it only on a CPU with AMX or AVX-512 BF16 "
                             "(elsewhere bf16 is emulated, about 10x slower than fp32)")
    parser.add_argument("--force", action="store_true",
                        help="delete --out (only a directory this script created) and rerun every stage")
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds:  # (--seed was ignored)
        parser.error("--seed and --seeds both choose the seeds: give one of them")
    args.seed = 0 if args.seed is None else args.seed
    sys.path.insert(0, ROOT)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file; name a directory", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.exists(os.path.join(args.out, OWNER_MARK)):
        # Its stages replace outputs made from other inputs: in a folder of someone else's files that deleted them.
        print(f"error: --out {args.out} holds files scripts/demo.py did not write (no {OWNER_MARK} in it); give "
              "--out a new or empty directory", file=sys.stderr)
        return 2
    try:
        if args.force and os.path.isdir(args.out):
            shutil.rmtree(args.out)
        os.makedirs(args.out, exist_ok=True)
        if not os.listdir(args.out):
            open(os.path.join(args.out, OWNER_MARK), "w").close()
    except OSError as err:
        print(f"error: --out {args.out}: {err}", file=sys.stderr)
        return 2
    profile = PROFILES[args.profile]
    native = cpu_has_native_bf16()
    profile = resolve_bf16(profile, args.bf16, native)
    if PROFILES[args.profile].bf16 and not profile.bf16:
        print(f"[demo] bf16 off ({'--bf16 no' if args.bf16 == 'no' else 'no AMX or AVX-512 BF16 on this CPU'}): "
              "fp32 throughout; the README's figures were measured in bf16 on an AMX CPU", flush=True)
    if args.seeds:
        args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would count twice in seeds.md
    runs = {s: os.path.join(args.out, f"seed_{s}") for s in args.seeds} if args.seeds else {args.seed: args.out}
    stage_s = {}
    for seed, out in runs.items():
        t0 = time.time()
        pipeline = Pipeline(out, profile, seed)
        try:
            pipeline.run()
        except StageFailed as err:
            print(err, file=sys.stderr, flush=True)
            return err.code
        stage_s[seed] = sum(pipeline.times.values())
        print(f"[demo] total {time.time() - t0:.0f} s (all stages, including any done before: {stage_s[seed]:.0f} s)"
              + (f" (seed {seed})" if args.seeds else ""), flush=True)
    if args.seeds:
        print("\n" + seed_summary(args.out, args.seeds, stage_s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
