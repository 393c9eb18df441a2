"""Benchmark interplab's hooked Transformer against Hugging Face and TransformerLens on CPU.

A random GPT-2 (4 layers, d_model 256, 8 heads, vocab 5000) is saved once; every contender loads those
same weights in its own process (TransformerLens lives in separate virtual environments: it pins its own
dependencies) and answers timing requests over a pipe. Contenders are timed in interleaved rounds (a
shuffled order each round), so a load spike on the shared machine hits all of them alike. Reported:
medians of wall and CPU time (``time.process_time``) per call, ratios as the median over rounds of the
per-round ratio, peak memory of caching every hook (extra peak RSS over a plain forward, measured in a fresh
process) and the bytes the cache holds, and loading times.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_model.py --out benchmarks/results/model.json

Peers (optional, recorded as missing if absent): ``--tl4-python /tmp/tl4-venv/bin/python`` (TransformerLens
4.x TransformerBridge) and ``--tl39-python /tmp/tl39-venv/bin/python`` (TransformerLens 3.9 HookedTransformer),
each a venv made with ``python3 -m venv X && X/bin/pip install torch==2.13.0 transformer-lens==VERSION``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["forward", "cache_resid", "cache_all", "cache_tl_set"]
RESID = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
# hook points interplab has and TransformerLens' HookedTransformer leaves out by default (split inputs,
# per-head results, hook_mlp_in): "cache_tl_set" caches the rest, the set TransformerLens caches
NOT_IN_TL_DEFAULT = ("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in")


# ------------------------------------------------------------------------------------------------
# worker side: runs inside each contender's interpreter; imports only torch/transformers/its library
# ------------------------------------------------------------------------------------------------
class Contender:
    def __init__(self, kind: str, model_dir: str, tok_dir: str) -> None:
        import torch

        self.kind, self.model_dir, self.tok_dir = kind, model_dir, tok_dir
        self.torch = torch
        self.model = self.load()

    def load(self):  # noqa: ANN201
        import torch

        if self.kind == "hf":
            import transformers

            return transformers.GPT2LMHeadModel.from_pretrained(self.model_dir).eval()
        if self.kind == "interplab":
            sys.path.insert(0, str(REPO))
            from interplab import load_model

            return load_model(self.model_dir)
        if self.kind == "tl4_bridge":
            import transformers
            from transformer_lens.model_bridge import TransformerBridge

            tok = transformers.PreTrainedTokenizerFast.from_pretrained(self.tok_dir)
            return TransformerBridge.boot_transformers(self.model_dir, device="cpu", tokenizer=tok).eval()
        if self.kind == "tl39_hooked":
            import transformers
            from transformer_lens import HookedTransformer, HookedTransformerConfig
            from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

            hf = transformers.GPT2LMHeadModel.from_pretrained(self.model_dir)
            c = hf.config
            cfg = HookedTransformerConfig(
                d_model=c.n_embd,
                n_layers=c.n_layer,
                n_heads=c.n_head,
                d_head=c.n_embd // c.n_head,
                d_mlp=4 * c.n_embd,
                d_vocab=c.vocab_size,
                n_ctx=c.n_positions,
                act_fn="gelu_new",
                normalization_type="LN",
                eps=c.layer_norm_epsilon,
                device="cpu",
                dtype=torch.float32,
            )
            model = HookedTransformer(cfg)
            model.load_and_process_state_dict(
                convert_gpt2_weights(hf, cfg),
                fold_ln=False,
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=False,
            )
            return model.eval()
        raise ValueError(f"unknown contender {self.kind!r}")

    def call(self, task: str, x):  # noqa: ANN001, ANN201
        """One call of a task; returns (logits, cache dict or None)."""
        m, kind = self.model, self.kind
        if kind == "hf":
            if task == "forward":
                return m(x).logits, None
            if task == "cache_resid":
                out = m(x, output_hidden_states=True)
                return out.logits, dict(enumerate(out.hidden_states))
            store = {}
            handles = [
                mod.register_forward_hook(lambda _m, _i, o, n=name: store.__setitem__(n, o))
                for name, mod in m.named_modules()
                if name
            ]
            try:
                return m(x).logits, store
            finally:
                for h in handles:
                    h.remove()
        if task == "forward":
            return m(x), None
        names = {
            "cache_resid": lambda n: n.endswith(RESID),
            "cache_all": None,
            "cache_tl_set": lambda n: not n.endswith(NOT_IN_TL_DEFAULT),
        }[task]
        if kind == "interplab":
            logits, cache = m.run_with_cache(x, names=names)
            return logits, cache
        logits, cache = m.run_with_cache(x, names_filter=names) if names else m.run_with_cache(x)
        return logits, cache

    def time(self, task: str, shape: list[int], reps: int) -> dict:
        torch = self.torch
        x = torch.randint(0, 5000, tuple(shape), generator=torch.Generator().manual_seed(1))
        wall, cpu = [], []
        with torch.no_grad():
            for _ in range(reps):
                w0, c0 = time.perf_counter(), time.process_time()
                out = self.call(task, x)
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
                del out
        return {"wall": wall, "cpu": cpu}

    def cache_bytes(self, task: str, shape: list[int]) -> dict:
        """Entries and bytes held by the cache (each storage counted once)."""
        torch = self.torch
        x = torch.randint(0, 5000, tuple(shape), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            _, cache = self.call(task, x)
        tensors = [v for v in _values(cache) if isinstance(v, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return {
            "entries": len(tensors),
            "bytes": sum(storages.values()),
            "bytes_counting_views_as_copies": sum(t.numel() * t.element_size() for t in tensors),
        }

    def memory(self, shape: list[int]) -> dict:
        """Extra peak RSS of one cache-all call over a plain forward (fresh process, so the peak is ours)."""
        for _ in range(2):
            self.time("forward", shape, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.time("cache_all", shape, 1)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"extra_peak_rss_bytes": (after - before) * 1024, **self.cache_bytes("cache_all", shape)}

    def logits(self) -> list[float]:
        torch = self.torch
        x = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            return self.call("forward", x)[0].flatten()[::997].tolist()


def _values(cache) -> list:  # noqa: ANN001
    if cache is None:
        return []
    if isinstance(cache, dict):
        return [v[0] if isinstance(v, tuple) else v for v in cache.values()]
    return [cache[k] for k in cache.keys()]  # noqa: SIM118 - ActivationCache-like objects


def worker(kind: str, model_dir: str, tok_dir: str) -> None:
    """Answer JSON requests on stdin; JSON answers go to the original stdout, everything else to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        contender = Contender(kind, model_dir, tok_dir)
    except Exception as err:  # noqa: BLE001 - reported to the driver as "not available"
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return
    info = {"ready": True, "first_load_s": time.perf_counter() - t0, "torch": torch.__version__}
    for pkg in ("transformers", "transformer_lens"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001
            pass
    out.write(json.dumps(info) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "threads":
            torch.set_num_threads(req["n"])
            res = {"threads": torch.get_num_threads()}
        elif op == "time":
            res = contender.time(req["task"], req["shape"], req["reps"])
        elif op == "cache_bytes":
            res = contender.cache_bytes(req["task"], req["shape"])
        elif op == "memory":
            res = contender.memory(req["shape"])
        elif op == "logits":
            res = {"logits": contender.logits()}
        elif op == "load":
            times = []
            for _ in range(req["reps"]):
                w0 = time.perf_counter()
                contender.load()
                times.append(time.perf_counter() - w0)
            res = {"load_s": times}
        else:
            res = {"error": f"unknown op {op}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------------
class Worker:
    def __init__(
        self, kind: str, python: str, model_dir: str, tok_dir: str, extra_env: dict | None = None
    ) -> None:
        env = {
            **os.environ,
            "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
            **(extra_env or {}),
        }
        self.kind = kind
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", kind, "--model", model_dir, "--tok", tok_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        self.info = json.loads(line) if line else {"error": "worker exited before answering"}

    @property
    def ok(self) -> bool:
        return "error" not in self.info

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def make_model(folder: Path) -> tuple[str, str]:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=256, n_layer=4, n_head=8, vocab_size=5000, n_positions=256, bos_token_id=1, eos_token_id=1
    )
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder / "gpt2")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(5000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w1"
    )
    fast.save_pretrained(folder / "tok")
    return str(folder / "gpt2"), str(folder / "tok")


def median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 3)


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_model_"))
    model_dir, tok_dir = make_model(tmp)
    pythons = {
        "hf": sys.executable,
        "interplab": sys.executable,
        "tl4_bridge": args.tl4_python,
        "tl39_hooked": args.tl39_python,
    }
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": os.getloadavg(),
        },
        "model": "random GPT-2: 4 layers, d_model 256, 8 heads, vocab 5000, float32",
        "method": "interleaved rounds (shuffled order); per call wall (perf_counter) and CPU (process_time); "
        "ms = median over all calls; ratio = median over rounds of the per-round ratio of medians",
        "contenders": {},
    }
    workers: dict[str, Worker] = {}
    for kind, python in pythons.items():
        if not python or not Path(python).exists():
            result["contenders"][kind] = {
                "available": False,
                "why": f"no interpreter at {python!r} (not installed)",
            }
            continue
        w = Worker(kind, python, model_dir, tok_dir)
        result["contenders"][kind] = {"available": w.ok, **w.info}
        if w.ok:
            workers[kind] = w
        else:
            w.close()
    ref = workers["hf"].ask(op="logits")["logits"]
    for kind, w in workers.items():
        got = w.ask(op="logits")["logits"]
        result["contenders"][kind]["max_abs_logit_diff_vs_hf"] = max(
            abs(a - b) for a, b in zip(got, ref, strict=True)
        )

    timings = time_rounds(workers, args.threads, args.shapes, args)
    result["timings"] = summarise(timings)
    result["ratios"] = ratios(timings)
    result["goals"] = goals(result["ratios"])
    for w in workers.values():
        w.close()

    if args.malloc_tuned_pass:
        # the same comparison with glibc malloc told to keep freed memory (no page faults for fresh pages):
        # caching every hook allocates ~140 MB per call, and on this VM first-touch page faults dominate
        env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
        tuned = {k: Worker(k, pythons[k], model_dir, tok_dir, env) for k in workers}
        t = time_rounds(tuned, [1], [(8, 128)], args)
        result["malloc_tuned"] = {"env": env, "timings": summarise(t), "ratios": ratios(t)}
        for w in tuned.values():
            w.close()

    # memory and loading, each contender in a fresh process
    result["memory_cache_all_8x128"] = {}
    result["load_s"] = {}
    for kind, python in pythons.items():
        if kind not in workers:
            continue
        w = Worker(kind, python, model_dir, tok_dir)
        mem = w.ask(op="memory", shape=[8, 128])
        mem["resid_stream_bytes"] = 4 * 8 * 128 * 256 * 4  # the 4 layers' resid_post, float32
        mem["cache_bytes_over_resid_stream"] = round(mem["bytes"] / mem["resid_stream_bytes"], 2)
        result["memory_cache_all_8x128"][kind] = mem
        loads = w.ask(op="load", reps=args.load_reps)["load_s"]
        result["load_s"][kind] = {
            "first_in_process_with_imports": round(w.info["first_load_s"], 4),
            "median_warm": round(statistics.median(loads), 4),
        }
        w.close()
    result["machine"]["load_avg_end"] = os.getloadavg()
    return result


def time_rounds(workers: dict, thread_counts: list[int], shapes: list[tuple[int, int]], args) -> dict:  # noqa: ANN001
    rng = random.Random(0)
    timings: dict = {}
    for threads in thread_counts:
        for w in workers.values():
            w.ask(op="threads", n=threads)
        for shape in shapes:
            reps = args.reps_large if shape[0] * shape[1] > 256 else args.reps_small
            for task in TASKS:
                for w in workers.values():  # warm-up
                    if w.kind != "hf" or task != "cache_tl_set":
                        w.ask(op="time", task=task, shape=list(shape), reps=1)
            for _ in range(args.rounds):
                for task in TASKS:
                    order = [k for k in workers if not (k == "hf" and task == "cache_tl_set")]
                    rng.shuffle(order)
                    for kind in order:
                        res = workers[kind].ask(op="time", task=task, shape=list(shape), reps=reps)
                        slot = timings.setdefault(
                            (threads, tuple(shape), task, kind), {"wall": [], "cpu": []}
                        )
                        slot["wall"].append(res["wall"])
                        slot["cpu"].append(res["cpu"])
    return timings


def summarise(timings: dict) -> list[dict]:
    rows = []
    for (threads, shape, task, kind), slot in sorted(timings.items()):
        wall = [x for r in slot["wall"] for x in r]
        cpu = [x for r in slot["cpu"] for x in r]
        rows.append(
            {
                "threads": threads,
                "shape": list(shape),
                "task": task,
                "contender": kind,
                "calls": len(wall),
                "wall_ms": median_ms(wall),
                "cpu_ms": median_ms(cpu),
            }
        )
    return rows


def _ratio(timings: dict, a: tuple, b: tuple, clock: str) -> float | None:
    if a not in timings or b not in timings:
        return None
    per_round = [
        statistics.median(x) / statistics.median(y)
        for x, y in zip(timings[a][clock], timings[b][clock], strict=True)
    ]
    return round(statistics.median(per_round), 3)


# (name, numerator, denominator, goal or None); keys are (task, contender)
COMPARISONS = [
    ("forward: interplab / hf", ("forward", "interplab"), ("forward", "hf")),
    ("forward: tl4_bridge / hf", ("forward", "tl4_bridge"), ("forward", "hf")),
    ("forward: tl39_hooked / hf", ("forward", "tl39_hooked"), ("forward", "hf")),
    ("cache_resid: interplab / interplab forward", ("cache_resid", "interplab"), ("forward", "interplab")),
    ("cache_resid: hf hidden_states / hf forward", ("cache_resid", "hf"), ("forward", "hf")),
    ("cache_all: interplab / tl4_bridge", ("cache_all", "interplab"), ("cache_all", "tl4_bridge")),
    ("cache_all: interplab / tl39_hooked", ("cache_all", "interplab"), ("cache_all", "tl39_hooked")),
    (
        "cache_tl_set: interplab / tl39_hooked cache_all",
        ("cache_tl_set", "interplab"),
        ("cache_all", "tl39_hooked"),
    ),
    (
        "cache_tl_set: interplab / tl4_bridge cache_all",
        ("cache_tl_set", "interplab"),
        ("cache_all", "tl4_bridge"),
    ),
    ("cache_all: interplab / hf forward", ("cache_all", "interplab"), ("forward", "hf")),
    ("cache_all: tl4_bridge / hf forward", ("cache_all", "tl4_bridge"), ("forward", "hf")),
    ("cache_all: tl39_hooked / hf forward", ("cache_all", "tl39_hooked"), ("forward", "hf")),
    ("cache_all: hf hooks on every module / hf forward", ("cache_all", "hf"), ("forward", "hf")),
]


def ratios(timings: dict) -> list[dict]:
    rows = []
    keys = {(t, s) for t, s, _, _ in timings}
    for threads, shape in sorted(keys):
        for name, (ta, ka), (tb, kb) in COMPARISONS:
            a, b = (threads, shape, ta, ka), (threads, shape, tb, kb)
            wall, cpu = _ratio(timings, a, b, "wall"), _ratio(timings, a, b, "cpu")
            if wall is not None:
                rows.append(
                    {"threads": threads, "shape": list(shape), "ratio": name, "wall": wall, "cpu": cpu}
                )
    return rows


def goals(rows: list[dict]) -> list[dict]:
    targets = [
        ("forward: interplab / hf", (8, 128), 1.05),
        ("forward: interplab / hf", (1, 16), 1.2),
        ("cache_resid: interplab / interplab forward", None, 1.05),
        ("cache_all: interplab / tl4_bridge", None, 0.75),
        ("cache_all: interplab / tl39_hooked", None, 0.75),
    ]
    out = []
    for name, shape, limit in targets:
        for r in rows:
            if r["ratio"] == name and (shape is None or tuple(r["shape"]) == shape):
                out.append(
                    {
                        "goal": f"{name} <= {limit}",
                        "threads": r["threads"],
                        "shape": r["shape"],
                        "wall": r["wall"],
                        "cpu": r["cpu"],
                        "met_wall": r["wall"] <= limit,
                        "met_cpu": r["cpu"] <= limit,
                    }
                )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model.json"))
    p.add_argument("--tl4-python", default="/tmp/tl4-venv/bin/python")
    p.add_argument("--tl39-python", default="/tmp/tl39-venv/bin/python")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps-large", type=int, default=3, help="calls per contender per round at 8x128")
    p.add_argument("--reps-small", type=int, default=25, help="calls per contender per round at 1x16")
    p.add_argument("--load-reps", type=int, default=5)
    p.add_argument("--shapes", nargs="+", default=["8x128", "1x16"], help="batch x pos, e.g. 8x128")
    p.add_argument(
        "--malloc-tuned-pass",
        action="store_true",
        help="also time 8x128 with glibc malloc keeping freed memory (for every contender)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tok", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.tok)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for row in result["ratios"] + result.get("malloc_tuned", {}).get("ratios", []):
        print(
            f"{row['threads']}t {row['shape'][0]}x{row['shape'][1]:<4} {row['ratio']:<52} wall {row['wall']:.3f}  cpu {row['cpu']:.3f}"
        )
    for g in result["goals"]:
        print(
            f"GOAL {g['goal']:<50} {g['threads']}t {g['shape']}: wall {g['wall']} cpu {g['cpu']} "
            f"{'met' if g['met_wall'] and g['met_cpu'] else 'NOT met'}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
